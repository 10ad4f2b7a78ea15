import json
import os
import threading
from pathlib import Path

import pytest

from omnigrpo.cli import main
from omnigrpo.config import inputs
from omnigrpo.data.prompts import PromptFileError, load_prompts
from omnigrpo.worlds import shapes


def test_world_prompts_exclude_the_held_out_set():
    prompts, metadata = load_prompts("shapes")
    held = {s.prompt for s in shapes.held_out_items()}
    assert prompts and not held & set(prompts)
    assert metadata[0].keys() == {"shape", "color", "position"}


def test_txt_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\na red circle at the top left\n\n  a sign that says \"OPEN\"  \n")
    prompts, metadata = load_prompts(str(path))
    assert prompts == ["a red circle at the top left", 'a sign that says "OPEN"'] and metadata == [{}, {}]


def test_unicode_line_separators_stay_inside_a_prompt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a poster\u2028with two lines\nsecond\n", encoding="utf-8")
    assert load_prompts(str(path))[0] == ["a poster\u2028with two lines", "second"]


def test_jsonl_keeps_metadata(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a shop sign", "text": "CAFE", "tags": ["ocr"]}) + "\n\n"
                    + json.dumps({"prompt": "a cat"}) + "\n")
    prompts, metadata = load_prompts(str(path))
    assert prompts == ["a shop sign", "a cat"]
    assert metadata == [{"text": "CAFE", "tags": ["ocr"]}, {}]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "ok"}', '{"prompt": "broken"'], "p.jsonl:2: not valid JSON"),
        (['{"prompt": "ok"}', '{"text": "x"}'], "p.jsonl:2: missing or empty 'prompt' field"),
        (['["a list"]'], "p.jsonl:1: expected an object"),
        (['{"prompt": "  "}'], "p.jsonl:1: missing or empty"),
        (['{"prompt": "ok", "tags": 5}'], "p.jsonl:1: 'tags' must be a string or a list of strings"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptFileError, match=message):
        load_prompts(str(path))


def test_parquet_and_datasets_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"prompt": "a red circle at the top left", "text": ""}, {"prompt": "a poster", "text": "SALE"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert load_prompts(str(tmp_path / "p.parquet")) == (["a red circle at the top left", "a poster"],
                                                        [{"text": ""}, {"text": "SALE"}])
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "ds"))[1][1] == {"text": "SALE"}


def test_unknown_sources_are_refused(tmp_path):
    with pytest.raises(PromptFileError, match="neither a built-in world"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    with pytest.raises(PromptFileError, match="unknown prompt file type '.csv'"):
        load_prompts(str(tmp_path / "p.csv"))
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))


def test_binary_corrupt_or_huge_prompt_files_name_the_file(tmp_path):
    (tmp_path / "binary.txt").write_bytes(b"a cat\n\xff\xfe\x00\x81 garbage\n")
    with pytest.raises(PromptFileError, match="binary.txt: not UTF-8 text"):
        load_prompts(str(tmp_path / "binary.txt"))
    (tmp_path / "binary.jsonl").write_bytes(b'{"prompt": "\xc3"}\n')
    with pytest.raises(PromptFileError, match="binary.jsonl: not UTF-8 text"):
        load_prompts(str(tmp_path / "binary.jsonl"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PromptFileError, match="broken.parquet: not a readable parquet table"):
        load_prompts(str(tmp_path / "broken.parquet"))
    (tmp_path / "huge.txt").write_text("a cat\n" + "x" * 100_000 + "\n")
    with pytest.raises(PromptFileError, match="huge.txt:2: a prompt of 100000 characters, over the limit"):
        load_prompts(str(tmp_path / "huge.txt"))
    (tmp_path / "huge.jsonl").write_text(json.dumps({"prompt": "y" * 20_000}) + "\n")
    with pytest.raises(PromptFileError, match="huge.jsonl:1: a prompt of 20000 characters"):
        load_prompts(str(tmp_path / "huge.jsonl"))


def test_cli_reports_a_bad_prompt_file_before_starting_anything(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{oops\n')
    config = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")
    code = main(["train", config, f"data.prompts={path}", f"run.dir={tmp_path / 'run'}"])
    assert code == 2
    assert "p.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_tagged_reward_that_matches_no_prompt_is_a_config_error(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle at the top left", "tags": ["shapes"]}\n')
    config = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")
    code = main(["train", config, f"data.prompts={path}", "rewards=[{name: shapes, tags: [ocr]}]",
                 f"run.dir={tmp_path / 'run'}"])
    assert code == 2
    assert "has tags ['ocr'] but no training prompt carries any of them" in capsys.readouterr().err


def _refused_at_once(source: str) -> str:
    """load_prompts(source)'s refusal, from a thread given 10 s: opening a FIFO would wait for a writer forever."""
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: outcome.extend(_raised(load_prompts, source)), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), f"load_prompts({source!r}) still reading after 10 s"
    assert outcome and isinstance(outcome[0], PromptFileError), outcome
    return str(outcome[0])


def _raised(fn, *args) -> list[BaseException]:
    try:
        fn(*args)
    except BaseException as err:  # noqa: BLE001 - handed to the test's thread
        return [err]
    return []


def test_a_fifo_a_device_or_a_link_to_one_is_refused_unopened(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    assert "pipe.txt: is a FIFO (named pipe), not a regular file" in _refused_at_once(str(tmp_path / "pipe.txt"))
    (tmp_path / "to_pipe.txt").symlink_to(tmp_path / "pipe.txt")
    assert "to_pipe.txt: is a FIFO (named pipe) (a link to" in _refused_at_once(str(tmp_path / "to_pipe.txt"))
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    assert "zero.txt: is a character device (a link to /dev/zero)" in _refused_at_once(str(tmp_path / "zero.txt"))


def test_a_prompt_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_INPUT_BYTES", 64)
    (tmp_path / "big.txt").write_text("a red circle\n" * 10)
    with pytest.raises(PromptFileError, match="big.txt: 130 bytes, over the limit of 64 for an input file"):
        load_prompts(str(tmp_path / "big.txt"))
    (tmp_path / "small.txt").write_text("a red circle\n")
    assert load_prompts(str(tmp_path / "small.txt"))[0] == ["a red circle"]


def test_json_lines_nested_past_the_stack_or_with_huge_integers_name_their_line(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": "a"}\n' + '{"prompt": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(PromptFileError, match="deep.jsonl:2: not a JSON line omnigrpo reads"):
        load_prompts(str(deep))
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"prompt": "a", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(PromptFileError, match="huge.jsonl:1: not a JSON line omnigrpo reads"):
        load_prompts(str(huge))


def test_a_fifo_inside_a_datasets_folder_is_refused_unopened(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "prompts"
    Dataset.from_dict({"prompt": ["a red circle"]}).save_to_disk(str(folder))
    (arrow,) = folder.glob("*.arrow")
    arrow.unlink()
    os.mkfifo(arrow)
    assert "is a FIFO (named pipe), not a regular file" in _refused_at_once(str(folder))
