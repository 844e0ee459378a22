"""What the scripts print when they fail: tokens redacted (issue #21 item 13), one-line messages only for the failures
the scripts expect and can name, a traceback (or its file and line) for the rest (item 12)."""

import pytest
from conftest import REPO, load_module

from diffusers_tread.training_utils import ArgumentParser, redact_tokens

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
