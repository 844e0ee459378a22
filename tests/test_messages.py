"""What the scripts print when they fail: tokens redacted (issue #21 item 13), one-line messages only for the failures
the scripts expect and can name, a traceback (or its file and line) for the rest (item 12)."""

import re

import pytest
import torch
from conftest import REPO, load_module

from diffusers_tread.training_utils import ArgumentParser, main_with_messages, redact_tokens

TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
# Each script in training/ with the arguments it requires, so that parsing gets as far as the unknown options.
SCRIPTS = {
    "train_tread.py": [],
    "train_tread_t2i_lora.py": ["--pretrained_model_name_or_path=org/model", "--train_data_dir=images"],
    "push_to_hub.py": ["folder", "--hub_model_id=user/model"],
    "evaluate.py": ["--pipeline=p", "--output_dir=o"],
    "extract_latents.py": ["--vae=v", "--output_dir=o"],
    "convert_checkpoint.py": ["--checkpoint=c.pt", "--output_dir=o"],
}


def test_every_training_script_is_covered():
    assert sorted(SCRIPTS) == sorted(path.name for path in (REPO / "training").glob("*.py"))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize(
    "mistake",
    [
        ["--hub_tok", TOKEN],  # an abbreviation: refused, and argparse repeats it in "unrecognized arguments"
        [f"--hub_tokn={TOKEN}"],  # a typo
        ["--hub-token", "not-an-hf-looking-secret"],  # the dash spelling, a token of another form
        [TOKEN],  # a stray positional (the option name lost in a shell line break)
    ],
)
def test_parser_errors_never_print_a_token(script, mistake, capsys):
    module = load_module(REPO / "training" / script)
    with pytest.raises(SystemExit) as error:
        module.parse_args([*SCRIPTS[script], *mistake])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and "<redacted>" in err, err
    assert TOKEN not in err and "not-an-hf-looking-secret" not in err, err


def test_redact_tokens_keeps_what_is_not_a_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plainsecret")
    assert redact_tokens("--tokenizer_name t5 hf_transfer hf_hub_download plainsecret") == (
        "--tokenizer_name t5 hf_transfer hf_hub_download <redacted>"
    )
    assert redact_tokens("['--hub_tok', 'abc'] --token=x --hub_token xyz") == (
        "['--hub_tok', '<redacted>'] --token=<redacted> --hub_token <redacted>"
    )


def test_parser_refuses_abbreviations_and_redacts_its_own_errors(capsys):
    parser = ArgumentParser(prog="p")
    parser.add_argument("--hub_token")
    parser.add_argument("--steps", type=int)
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", TOKEN])  # the token given to the wrong option: "invalid int value: 'hf_...'"
    err = capsys.readouterr().err
    assert "invalid int value" in err and TOKEN not in err
    with pytest.raises(SystemExit):
        parser.parse_args(["--hub_t", "abc"])
    assert "unrecognized arguments: --hub_t <redacted>" in capsys.readouterr().err


def run_main(main, monkeypatch, capsys):
    """``main_with_messages(main)``: ``(exit code or the exception it let through, stderr)``."""
    monkeypatch.delenv("TREAD_TRACEBACK", raising=False)
    try:
        main_with_messages(main)
    except SystemExit as exit:
        return exit.code, capsys.readouterr().err
    except Exception as error:  # what a traceback would show
        return error, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_expected_failures_are_one_line_with_where_they_were_raised(monkeypatch, capsys):
    def bad_settings():
        raise ValueError("--resolution must be a multiple of 16")

    code, err = run_main(bad_settings, monkeypatch, capsys)
    line = bad_settings.__code__.co_firstlineno + 1
    assert code == 1 and err.splitlines() == [
        "error: ValueError: --resolution must be a multiple of 16",
        f"(raised at tests/test_messages.py:{line}; set TREAD_TRACEBACK=1 to see the traceback)",
    ]

    def failed_upload():  # the library's own RuntimeError messages stay one line
        from diffusers_tread import hub

        monkeypatch.setattr(
            hub.uploads, "upload_output", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline"))
        )
        hub.upload_final_output("out", "user/model", token=TOKEN)

    code, err = run_main(failed_upload, monkeypatch, capsys)
    assert code == 1 and err.startswith("error: RuntimeError: Uploading out to user/model failed: offline."), err
    assert re.search(r"\(raised at \S*hub\S*\.py:\d+; set TREAD_TRACEBACK=1", err), err  # hub.py or a hub/ module

    def missing_file():  # raised in another library: also where our code called it
        import safetensors.torch

        safetensors.torch.load_file("/nonexistent/weights.safetensors")

    code, err = run_main(missing_file, monkeypatch, capsys)
    assert code == 1 and "safetensors/torch.py:" in err and ", called from tests/test_messages.py:" in err, err


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
        lambda: KeyError("num_layers"),
        lambda: TypeError("'NoneType' object is not subscriptable"),
    ],
)
def test_unexpected_errors_keep_their_traceback(make_error, monkeypatch, capsys):
    error = make_error()

    def main():
        raise error

    raised, err = run_main(main, monkeypatch, capsys)
    assert raised is error and err == ""


@pytest.mark.parametrize(
    "bug",
    [
        lambda: torch.nn.Linear(5, 4)(torch.zeros(2, 3)),  # raised inside torch's module code
        lambda: torch.cat([torch.zeros(2), torch.zeros(2, 2)]),  # a PyTorch op called right here (raised from C)
    ],
)
def test_a_failed_pytorch_operation_keeps_its_traceback(bug, monkeypatch, capsys):
    raised, err = run_main(bug, monkeypatch, capsys)
    assert type(raised) is RuntimeError and err == ""
