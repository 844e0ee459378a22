"""The state-space backbone compiles: a `TreadSSM2DModel` training step (forward, loss, backward; dense and routed)
traces as one graph with the selective scan's custom operators inside (no graph break, static shapes), computes what
the eager step does, and the operators match the sequential reference forwards and backwards."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from diffusers_tread import TreadSSM2DModel
from diffusers_tread.models import ssm_tread
from diffusers_tread.models.ssm_tread import selective_scan, selective_scan_reference

TINY_SSM = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    hidden_size=32,
    state_size=8,
    mlp_ratio=2.0,
    num_embeds_ada_norm=10,
)
ROUTE = {"start_layer_idx": 0, "end_layer_idx": 0, "selection_ratio": 0.5}  # then one dense block


@pytest.fixture(autouse=True)
def one_thread_and_fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add waits on a busy machine
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def tiny_ssm(**overrides) -> TreadSSM2DModel:
    """Random weights everywhere (the zero-initialised adaLN-Zero and output layers too, else the blocks are the
    identity and the comparisons vacuous)."""
    torch.manual_seed(0)
    model = TreadSSM2DModel(**{**TINY_SSM, **overrides}).train()
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(std=0.2)
    return model


def model_inputs(batch_size=3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 4, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (batch_size,), generator=generator)
    y = torch.randint(0, 10, (batch_size,), generator=generator)
    target = torch.randn(batch_size, 8, 8, 8, generator=generator)
    return x, t, y, target


def scan_inputs(batch=2, dim=5, state=4, length=11, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(batch, dim, length, generator=generator, dtype=dtype),  # u
        torch.rand(batch, dim, length, generator=generator, dtype=dtype) * 2,  # delta > 0
        -torch.rand(dim, state, generator=generator, dtype=dtype) * 4 - 0.1,  # A < 0
        torch.randn(batch, state, length, generator=generator, dtype=dtype),  # B
        torch.randn(batch, state, length, generator=generator, dtype=dtype),  # C
        torch.randn(dim, generator=generator, dtype=dtype),  # D
    ]
    return [tensor.requires_grad_() for tensor in tensors]


def training_step(model, compiled_forward, inputs, seed=0):
    """Forward + MSE loss (compiled or not) and backward; the global RNG seeded first (the routed subsets)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = compiled_forward(*inputs)
    loss.backward()
    return loss.detach(), {name: param.grad for name, param in model.named_parameters()}


def loss_of(model):
    def forward_and_loss(x, t, y, target):
        return torch.nn.functional.mse_loss(model(x, t, y).sample, target)

    return forward_and_loss


def recording_backend(graphs):
    """aot_eager (forward and backward traced by AOTAutograd, as inductor does, without code generation) that keeps
    the forward and backward graphs it was given."""

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def scan_calls(graph, name):
    return sum(1 for node in graph.graph.nodes if node.op == "call_function" and name in str(node.target))


@pytest.mark.parametrize("chunk_steps", [3, 1000])  # several chunks (the last one shorter), one chunk
def test_scan_operators_pass_opcheck(chunk_steps):
    # schema, fake (meta) implementations, autograd registration, and tracing by AOTAutograd, against the real kernel
    u, delta, A, B, C, _ = scan_inputs(dtype=torch.float32)
    chunk = min(chunk_steps, u.shape[-1])
    torch.library.opcheck(ssm_tread._selective_scan_forward, (u, delta, A, B, C, chunk))
    y, boundaries = ssm_tread._selective_scan_forward(u, delta, A, B, C, chunk)
    backward_args = (torch.randn_like(y), u, delta, A, B, C, boundaries.detach(), chunk)
    backward_args = [arg.detach() if torch.is_tensor(arg) else arg for arg in backward_args]
    torch.library.opcheck(ssm_tread._selective_scan_backward, backward_args)


def test_compiled_scan_equals_the_reference_and_passes_gradcheck(monkeypatch):
    monkeypatch.setattr(ssm_tread, "SCAN_MIN_CHUNK_STEPS", 4)  # 11 steps: chunks of 4, 4, 3
    monkeypatch.setattr(ssm_tread, "SCAN_CHUNK_ELEMENTS", 1)
    args = scan_inputs()
    graphs = []
    compiled = torch.compile(selective_scan, fullgraph=True, backend=recording_backend(graphs))
    out, reference = compiled(*args), selective_scan_reference(*args)
    grad_out = torch.randn_like(reference)
    grads = torch.autograd.grad(out, args, grad_out)
    # the forward graph calls the scan operator, the backward graph its backward operator (no unrolled time loop)
    assert [scan_calls(graph, "selective_scan_backward") for graph in graphs] == [0, 1]
    assert scan_calls(graphs[0], "selective_scan.") == 1
    # float64, a different summation order than the reference's loop: equal to rounding
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for grad, reference_grad in zip(grads, torch.autograd.grad(reference, args, grad_out), strict=True):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-11, atol=1e-11)
    # finite differences through the compiled function (its backward is the compiled backward graph; gradcheck runs
    # it with retain_graph, which buffers donated to the backward do not allow)
    with torch._functorch.config.patch(donated_buffer=False):
        torch._dynamo.reset()
        assert torch.autograd.gradcheck(torch.compile(selective_scan, fullgraph=True, backend="aot_eager"), args)


@pytest.mark.parametrize("routes", [None, [ROUTE]], ids=["dense", "routed"])
def test_training_step_traces_as_one_graph_and_equals_eager(routes):
    model = tiny_ssm(routes=routes)
    inputs = model_inputs()
    graphs = []
    compiled = torch.compile(loss_of(model), fullgraph=True, backend=recording_backend(graphs))  # raises on a break
    loss, grads = training_step(model, compiled, inputs)
    eager_loss, eager_grads = training_step(model, loss_of(model), inputs)
    assert not torch._dynamo.utils.counters["graph_break"]
    forward_graph, backward_graph = graphs  # one forward and one backward graph for the whole step
    scans = 2 * TINY_SSM["num_layers"]  # two directions per block
    assert (
        scan_calls(forward_graph, "selective_scan.") == scan_calls(backward_graph, "selective_scan_backward") == scans
    )
    # no data-dependent shapes and nothing read back to the host: no symbolic sizes, no .item()-like ops
    for graph in graphs:
        for node in graph.graph.nodes:
            assert "local_scalar_dense" not in str(node.target) and "nonzero" not in str(node.target)
            assert not any(isinstance(size, torch.SymInt) for size in getattr(node.meta.get("val"), "shape", ()))
    # the same ops on the same numbers (AOTAutograd only reorders independent ones); the routed step draws the same
    # subsets from the global RNG
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_inductor_compiled_scan_step_equals_eager_and_the_reference():
    # Inductor proper: generated C++ kernels around the scan's operators (extern calls), forward and backward. Only the
    # scan and a loss, as a whole model's cold compile is minutes on 2 busy cores (bench/ssm_compile.py compiles it).
    def scan_loss(u, delta, A, B, C, D):
        return selective_scan(u, delta, A, B, C, D).square().sum()

    args = scan_inputs(dtype=torch.float32, length=40)  # 40 steps: several chunks at the default chunk size
    compiled = torch.compile(scan_loss, fullgraph=True)
    for scale in (1.0, 0.5):  # the second call reuses the graph
        inputs = [(arg.detach() * scale).requires_grad_() for arg in args]
        loss = compiled(*inputs)
        grads = torch.autograd.grad(loss, inputs)
        eager_loss = scan_loss(*inputs)
        reference_loss = selective_scan_reference(*inputs).square().sum()
        # the operators run the eager code; only the loss's sum is generated code: equal to float32 rounding
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=0)
        for grad, eager_grad, reference_grad in zip(
            grads, torch.autograd.grad(eager_loss, inputs), torch.autograd.grad(reference_loss, inputs), strict=True
        ):
            torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
