import subprocess
import sys

import pytest

from gptrain.cli import main


def test_no_command_prints_usage_to_stderr_and_fails(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "commands:" in capsys.readouterr().err


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
