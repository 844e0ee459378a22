"""A pickled weights file that would run code when unpickled, and the check that Diffusers refused it."""

import pickle
from pathlib import Path

import pytest
import torch


class CodeRunningPayload:
    """Unpickling this calls ``exec``, which writes ``marker``: what a malicious ``.bin`` would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def poison(weights_file: Path, marker: Path) -> None:
    """Add a `CodeRunningPayload` to a saved ``.bin`` state dict (its tensors stay as they are)."""
    state_dict = torch.load(weights_file, weights_only=True)
    state_dict["payload"] = CodeRunningPayload(marker)
    torch.save(state_dict, weights_file)


def assert_refused_by_weights_only(excinfo: pytest.ExceptionInfo, weights_file: Path, marker: Path) -> None:
    """Diffusers' ``load_state_dict`` loads ``.bin`` with ``torch.load(weights_only=True)``; the unpickler rejects the
    ``exec`` global and Diffusers re-raises that as ``OSError("Unable to load weights from checkpoint file ...")``."""
    assert excinfo.type is OSError and "Unable to load weights from checkpoint file" in str(excinfo.value)
    assert str(weights_file) in str(excinfo.value)
    chain, error = [], excinfo.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e) for e in chain)
    assert any("Unsupported global" in str(e) and "exec" in str(e) for e in chain)
    assert not marker.exists()  # the payload never ran
