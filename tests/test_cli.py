import subprocess
import sys

import pytest

from gptrain.cli import SUBCOMMANDS, main


def test_no_command_prints_usage_to_stderr_and_fails(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "commands:" in capsys.readouterr().err


@pytest.mark.parametrize("command, option", [("prepare", "--tokenizer"), ("generate", "--top_p"),
                                             ("eval", "--max_tokens"), ("export", "--model_path"),
                                             ("plot", "RUN_DIR"), ("harness", "--tasks"), ("serve", "--max_batch_size"),
                                             ("launch", "torchrun")])
def test_each_command_is_listed_and_dispatched_to_its_help(capsys, command, option):
    with pytest.raises(SystemExit) as e:
        main([])
    assert f"  {command} " in capsys.readouterr().err
    try:
        main([command, "--help"])
    except SystemExit as e:
        assert e.code == 0
    assert option in capsys.readouterr().out
    assert set(SUBCOMMANDS) == {"prepare", "train", "generate", "eval", "export", "plot", "harness", "serve", "launch"}


def test_train_help_lists_every_setting_with_its_help(capsys):
    main(["train", "--help"])
    out = capsys.readouterr().out
    assert "gradient_accumulation_steps" in out and "divided by the world size" in out


def test_the_installed_command_dispatches_to_prepare(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("to be or not to be\n" * 50)
    result = subprocess.run([sys.executable, "-m", "gptrain.cli", "prepare", "--input", str(corpus), "--tokenizer",
                             "char", "--out_dir", str(tmp_path / "out"), "--num_proc", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "meta.json").is_file()
