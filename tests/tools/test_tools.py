"""Tools: schema parsing, the config file, the calculator and the sandboxed Python tool (real subprocesses)."""
import asyncio

import pytest

from verl.tools.calculator_tool import CalculatorTool, evaluate_expression
from verl.tools.sandbox_python_tool import SandboxPythonTool, network_isolation_available, run_python_sandboxed
from verl.tools.schemas import OpenAIFunctionToolSchema
from verl.tools.utils.tool_registry import initialize_tools_from_config


def test_calculator_evaluates_arithmetic_and_refuses_code():
    assert evaluate_expression("(3 + 4) * 5 - 2 ** 3") == 27
    assert evaluate_expression("7 / 2") == 3.5
    for bad in ("__import__('os')", "x + 1", "2 ** 100000", "1 / 0"):
        with pytest.raises(ValueError):
            evaluate_expression(bad)
    tool = CalculatorTool()
    response, _, metrics = asyncio.run(tool.execute("i", {"expression": "6*7"}))
    assert response.text == "42" and metrics["ok"]
    response, _, metrics = asyncio.run(tool.execute("i", {"expression": "open('x')"}))
    assert response.text.startswith("Error") and not metrics["ok"]


def test_schema_errors_name_the_key():
    with pytest.raises(ValueError, match="function.name"):
        OpenAIFunctionToolSchema.from_dict({"type": "function", "function": {}})
    with pytest.raises(ValueError, match="required names"):
        OpenAIFunctionToolSchema.from_dict({
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "type": "object",
                    "properties": {},
                    "required": ["a"]
                }
            }
        })


def test_tool_config_file(tmp_path):
    path = tmp_path / "tools.yaml"
    path.write_text("tools:\n"
                    "  - class_name: verl.tools.calculator_tool.CalculatorTool\n"
                    "    config: {type: native}\n"
                    "  - class_name: verl.tools.sandbox_python_tool.SandboxPythonTool\n"
                    "    config: {timeout_s: 3}\n"
                    "    tool_schema:\n"
                    "      type: function\n"
                    "      function:\n"
                    "        name: run_py\n"
                    "        description: run python\n"
                    "        parameters: {type: object, properties: {code: {type: string}}, required: [code]}\n")
    tools = initialize_tools_from_config(str(path))
    assert [t.name for t in tools] == ["calculator", "run_py"]
    assert tools[1].config["timeout_s"] == 3
    assert tools[0].tool_schema.to_dict()["function"]["parameters"]["required"] == ["expression"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("tools:\n  - config: {}\n")
    with pytest.raises(ValueError, match="class_name"):
        initialize_tools_from_config(str(bad))


def test_sandbox_runs_code_in_a_temp_dir_with_limits():
    result = run_python_sandboxed("import os; print(6 * 7); print(os.getcwd())")
    assert result["ok"] and result["stdout"].splitlines()[0] == "42"
    assert "verl_sandbox_" in result["stdout"]
    slow = run_python_sandboxed("while True: pass", timeout_s=1.0)
    assert slow["timed_out"] and not slow["ok"]
    hog = run_python_sandboxed("x = bytearray(400 * 1024 * 1024); print('allocated')", memory_limit_mb=200)
    assert not hog["ok"] and "MemoryError" in hog["stderr"]


@pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not available here")
def test_sandbox_has_no_network():
    code = ("import socket\n"
            "s = socket.socket()\n"
            "s.settimeout(2)\n"
            "try:\n"
            "    s.connect(('1.1.1.1', 80)); print('connected')\n"
            "except OSError as e:\n"
            "    print('blocked', e)\n")
    result = run_python_sandboxed(code, network="require")
    assert result["network_isolated"] and "blocked" in result["stdout"]


def test_sandbox_tool_reports_errors():
    tool = SandboxPythonTool(config={"timeout_s": 2})
    response, _, metrics = asyncio.run(tool.execute("i", {"code": "raise SystemExit('boom')"}))
    assert "boom" in response.text and not metrics["ok"]
