"""Bad data and configs fail when the dataset is built, naming the file, row, column or key and the fix."""
import copy
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from verl.models.tiny import get_tiny_model_path
from verl.utils.dataset import MultiTurnSFTDataset, RLHFDataset, SFTDataset
from verl.utils.dataset.schema import DataFormatError
from verl.utils.dataset.tasks import write_arithmetic_task, write_countdown_task


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_tiny_model_path())


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_arithmetic_task(str(tmp_path_factory.mktemp("good")), train_size=6, test_size=2)["train"]


def _write(path, rows=None, table=None):
    pq.write_table(table if table is not None else pa.Table.from_pylist(rows), path)
    return str(path)


def _prompt(text="What is 1 + 1?"):
    return [{"role": "user", "content": text}]


def test_missing_data_file_is_named(tokenizer, good, tmp_path):
    missing = str(tmp_path / "nowhere" / "train.parquet")
    with pytest.raises(FileNotFoundError, match=r"nowhere/train\.parquet.*data\.train_files"):
        RLHFDataset([good, missing], tokenizer, {"max_prompt_length": 64})
    with pytest.raises(IsADirectoryError, match="train.parquet"):
        RLHFDataset(str(tmp_path), tokenizer, {"max_prompt_length": 64})
    with pytest.raises(ValueError, match="no data files"):
        RLHFDataset([], tokenizer, {"max_prompt_length": 64})
    bad_suffix = tmp_path / "data.csv"
    bad_suffix.write_text("a,b\n")
    with pytest.raises(DataFormatError, match=r"data\.csv.*\.parquet"):
        RLHFDataset(str(bad_suffix), tokenizer, {"max_prompt_length": 64})


def test_missing_column_names_column_file_and_available(tokenizer, tmp_path):
    path = _write(tmp_path / "noprompt.parquet", [{"question": "q", "data_source": "arithmetic"}])
    with pytest.raises(DataFormatError) as err:
        RLHFDataset(path, tokenizer, {"max_prompt_length": 64})
    msg = str(err.value)
    assert "'prompt'" in msg and "noprompt.parquet" in msg and "['question', 'data_source']" in msg
    assert "data.prompt_key" in msg
    # a custom prompt_key is what gets checked
    good = _write(tmp_path / "q.parquet", [{"question": _prompt()}])
    assert len(RLHFDataset(good, tokenizer, {"max_prompt_length": 64, "prompt_key": "question"})) == 1
    with pytest.raises(DataFormatError, match="no column 'chat'"):
        RLHFDataset(good, tokenizer, {"max_prompt_length": 64, "prompt_key": "chat"})


@pytest.mark.parametrize(
    "bad,detail",
    [
        ("What is 1 + 1?", "got str 'What is 1 \\+ 1\\?'"),
        ([], "empty list"),
        ([{
            "role": "user"
        }], "message 0 has content=None"),
        ([{
            "role": "user",
            "content": "ok"
        }, "oops"], "message 1 is str"),
    ],
)
def test_wrong_prompt_type_names_row_and_expected_format(tokenizer, tmp_path, bad, detail):
    rows = [{"prompt": _prompt(), "data_source": "x"} for _ in range(3)]
    path = tmp_path / "bad.jsonl"  # jsonl: parquet cannot even hold mixed types in one column
    rows[2]["prompt"] = bad
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataFormatError) as err:
        RLHFDataset(str(path), tokenizer, {"max_prompt_length": 64})
    msg = str(err.value)
    assert "row 2 of file" in msg and "bad.jsonl" in msg and "column 'prompt'" in msg
    assert "expected a list of chat messages" in msg and "'role'" in msg and "'content'" in msg
    assert re.search(detail, msg), msg


def test_wrong_prompt_type_in_parquet(tokenizer, tmp_path):
    path = _write(tmp_path / "strprompt.parquet", [{"prompt": "just a string", "data_source": "x"}])
    with pytest.raises(DataFormatError, match=r"row 0 of file .*strprompt\.parquet.*expected a list of chat"):
        RLHFDataset(path, tokenizer, {"max_prompt_length": 64})


def test_empty_dataset_names_files(tokenizer, tmp_path):
    schema = pa.schema([("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    path = _write(tmp_path / "empty.parquet", table=schema.empty_table())
    with pytest.raises(DataFormatError, match=r"empty\.parquet.*contain no rows"):
        RLHFDataset(path, tokenizer, {"max_prompt_length": 64})


def test_all_rows_filtered_mentions_filter_overlong_prompts(tokenizer, tmp_path):
    path = write_countdown_task(str(tmp_path / "cd"), train_size=3, test_size=1)["train"]
    with pytest.raises(DataFormatError) as err:
        RLHFDataset(path, tokenizer, {"max_prompt_length": 8, "filter_overlong_prompts": True})
    msg = str(err.value)
    assert "all 3 prompts" in msg and "train.parquet" in msg
    assert "data.filter_overlong_prompts=True" in msg and "data.max_prompt_length=8" in msg


def test_overlong_prompt_with_truncation_error(tokenizer, good):
    with pytest.raises(ValueError) as err:
        RLHFDataset(good, tokenizer, {"max_prompt_length": 10, "truncation": "error"})
    msg = str(err.value)
    assert "row 0 of file" in msg and "train.parquet" in msg and "data.max_prompt_length=10" in msg
    assert "6 of 6 prompts" in msg
    assert "data.filter_overlong_prompts=True" in msg and "data.truncation=left" in msg
    length = int(msg.split(" has ")[1].split(" tokens")[0])
    assert length > 10
    # the default truncation is error too
    with pytest.raises(ValueError, match="data.max_prompt_length=10"):
        RLHFDataset(good, tokenizer, {"max_prompt_length": 10})


def test_unknown_truncation_mode(tokenizer, good):
    with pytest.raises(ValueError, match=r"data.truncation='cut'.*'left', 'right', 'middle'"):
        RLHFDataset(good, tokenizer, {"max_prompt_length": 64, "truncation": "cut"})
    with pytest.raises(ValueError, match=r"data.truncation='middle'.*\['error', 'left', 'right'\]"):
        SFTDataset(good, tokenizer, {"truncation": "middle"})


def test_tokenizer_without_chat_template(tokenizer, good):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError) as err:
        RLHFDataset(good, plain, {"max_prompt_length": 64})
    msg = str(err.value)
    assert "no chat template" in msg and "custom_chat_template" in msg and "tokenizer_config.json" in msg
    with pytest.raises(ValueError, match="no chat template"):
        MultiTurnSFTDataset(good, plain, {})


def test_sft_bad_inputs(tokenizer, good, tmp_path):
    with pytest.raises(DataFormatError, match=r"no column 'messages'.*available: \['data_source', 'prompt'"):
        MultiTurnSFTDataset(good, tokenizer, {})
    no_reply = _write(tmp_path / "noreply.parquet", [{"messages": _prompt()}])
    with pytest.raises(DataFormatError, match=r"row 0 of file .*noreply\.parquet' has no assistant message"):
        MultiTurnSFTDataset(no_reply, tokenizer, {})
    with pytest.raises(DataFormatError, match=r"response \(data.response_key='prompt'\) is list, expected a string"):
        SFTDataset(good, tokenizer, {"prompt_key": "prompt", "response_key": "prompt"})
    with pytest.raises(DataFormatError, match=r"cannot read extra_info\['nope'\].*data.response_dict_keys"):
        SFTDataset(good, tokenizer, {
            "prompt_key": "prompt",
            "response_key": "extra_info",
            "response_dict_keys": ["nope"]
        })
    with pytest.raises(DataFormatError, match=r"no column 'response'"):
        SFTDataset(good, tokenizer, {})
