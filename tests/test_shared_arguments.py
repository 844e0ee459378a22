"""Both training scripts declare their shared options (optimisation, run folder, checkpoints, logging, Hub) through
the library's `add_optimization_arguments` / `add_run_arguments`, and check step intervals with
`check_step_intervals`: one declaration, the same names and meaning in both."""

import pytest
from conftest import REPO, load_module

from diffusers_tread import training_utils

SCRIPTS = {
    "train_tread.py": [],
    "train_tread_t2i_lora.py": ["--pretrained_model_name_or_path=org/model", "--train_data_dir=images"],
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_take_the_shared_options_from_the_library(name, monkeypatch, tmp_path, capsys):
    calls = []
    for function in ("add_optimization_arguments", "add_run_arguments", "check_step_intervals"):
        original = getattr(training_utils, function)

        def recording(*args, _original=original, _name=function, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(training_utils, function, recording)
    script = load_module(REPO / "training" / name)  # imports the (patched) library functions
    args = script.parse_args([*SCRIPTS[name], f"--output_dir={tmp_path / 'out'}", "--seed=3"])
    assert calls == ["add_optimization_arguments", "add_run_arguments", "check_step_intervals"]
    assert args.seed == 3 and args.logging_steps == 10 and args.checkpointing_steps == 500 and args.hub_token is None
    with pytest.raises(SystemExit):
        script.parse_args([*SCRIPTS[name], f"--output_dir={tmp_path / 'out'}", "--logging_steps=0"])
    assert "--logging_steps must be at least 1 (it is a step interval)" in capsys.readouterr().err


def test_train_tread_final_stages_take_the_run_state():
    """train_tread.py's final stages read the run (args, argv, repo, steps, batch size, clock) from one `RunState`
    instead of 11 and 14 positional arguments."""
    import inspect

    script = load_module(REPO / "training" / "train_tread.py")
    for name in ("save_final_pipeline", "save_model_card"):
        parameters = list(inspect.signature(getattr(script, name)).parameters)
        assert "run" in parameters and len(parameters) <= 6, (name, parameters)
