"""Agent loops for server-mode rollouts (``actor_rollout_ref.rollout.mode=async``): see
:mod:`verl.experimental.agent_loop.agent_loop`."""
from verl.experimental.agent_loop.agent_loop import (AgentLoopBase, AgentLoopManager, AgentLoopOutput,
                                                     AsyncLLMServerManager, assemble_agent_outputs,
                                                     get_agent_loop_class, register)
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop

__all__ = [
    "AgentLoopBase", "AgentLoopManager", "AgentLoopOutput", "AsyncLLMServerManager", "SingleTurnAgentLoop",
    "ToolAgentLoop", "assemble_agent_outputs", "get_agent_loop_class", "register"
]
