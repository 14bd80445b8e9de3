"""Feature taps: the right tensors, idempotent under gradient checkpointing, no hooks left behind, DDP-safe."""

import socket

import pytest
import torch
import torch.nn.functional as F
from conftest import unet_inputs

from koala.distill.taps import FeatureTaps, list_tap_points, unwrap
from koala.models.archs import TINY_UNET_CONFIG
from koala.models.specs import get_spec
from koala.models.unets import build_student, build_unet, count_self_attention

SA = "down_blocks.1.attentions.0.transformer_blocks.1.attn1"
BLOCK = SA.rpartition(".")[0]


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_unet(TINY_UNET_CONFIG).eval()


def record_calls(module):
    """Test-side hook recording every (args, kwargs, output) of a module; returns (calls, handle)."""
    calls = []
    handle = module.register_forward_hook(lambda m, a, k, o: calls.append((a, k, o)), with_kwargs=True)
    return calls, handle


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_sa_ca_ffn_equal_the_transformer_block_computed_by_hand():
    unet = tiny()
    block = unet.get_submodule(BLOCK)
    names = {k: f"{BLOCK}.{m}" for k, m in (("sa", "attn1"), ("ca", "attn2"), ("ffn", "ff"))}
    points = [p for p in list_tap_points(unet, ["sa", "ca", "ffn"]) if p.name in names.values()]
    calls, handle = record_calls(block)
    x = unet_inputs(size=8)
    with torch.no_grad(), FeatureTaps(unet, points) as taps, FeatureTaps(unet, points[:1], sa_point="residual") as res:
        unet(**x)
        handle.remove()
        (h,), kwargs, _ = calls[0]
        ehs = kwargs["encoder_hidden_states"]
        sa = block.attn1(block.norm1(h))  # h = attn1(norm1(h)) + h, then attn2 and ff the same way
        h1 = sa + h
        ca = block.attn2(block.norm2(h1), encoder_hidden_states=ehs)
        h2 = ca + h1
        ffn = block.ff(block.norm3(h2))
    assert torch.equal(taps.features[names["sa"]], sa)
    assert torch.equal(res.features[names["sa"]], h1)
    assert torch.equal(taps.features[names["ca"]], ca)
    assert torch.equal(taps.features[names["ffn"]], ffn)
    assert torch.equal(ffn + h2, calls[0][2])  # and the block's own output follows from them


@pytest.mark.parametrize("kind", ["lf", "rb"])
def test_block_and_resnet_outputs_equal_a_recomputation(kind):
    unet = tiny()
    points = list_tap_points(unet, [kind])
    modules = [unet.get_submodule(p.name) for p in points]
    recorders = [record_calls(m) for m in modules]
    with torch.no_grad(), FeatureTaps(unet, points) as taps:
        unet(**unet_inputs(size=8))
        for p, m, (calls, handle) in zip(points, modules, recorders):
            handle.remove()
            args, kwargs, _ = calls[0]
            again = m(*args, **kwargs)
            hidden = again[0] if isinstance(again, tuple) else again  # down blocks: (hidden, res_samples)
            assert torch.equal(taps.features[p.name], hidden), p.name
    assert {p.block for p in points} == {
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    }


def test_list_tap_points_filters_and_names_valid_choices():
    unet = tiny()
    assert len(list_tap_points(unet, ["sa"])) == count_self_attention(unet)
    enc = list_tap_points(unet, ["sa"], stages=["encoder"])
    assert enc and all(p.stage == "encoder" and p.name.startswith("down_blocks") for p in enc)
    up0 = list_tap_points(unet, ["sa", "rb"], blocks=["up_blocks.0"])
    assert {p.block for p in up0} == {"up_blocks.0"} and {p.kind for p in up0} == {"sa", "rb"}
    assert [p.name for p in list_tap_points(unet, ["lf"], stages=["mid"])] == ["mid_block"]
    with pytest.raises(ValueError, match="sa, ca, ffn, lf, rb"):
        list_tap_points(unet, ["attn"])
    with pytest.raises(ValueError, match="encoder, mid, decoder"):
        list_tap_points(unet, stages=["middle"])
    student = build_student(TINY_UNET_CONFIG, get_spec("tiny-700m"))
    with pytest.raises(ValueError, match="down_blocks.0, down_blocks.1, down_blocks.2, up_blocks.0"):
        list_tap_points(student, blocks=["mid_block"])
    with pytest.raises(ValueError, match="attn1, residual"):
        FeatureTaps(unet, [], sa_point="output")


def test_first_capture_kept_until_reset_and_detach():
    unet = tiny()
    points = list_tap_points(unet, ["sa"], blocks=["down_blocks.1"])
    a, b = unet_inputs(size=8, seed=1), unet_inputs(size=8, seed=2)
    with FeatureTaps(unet, points) as taps, FeatureTaps(unet, points, detach=True) as frozen:
        unet(**a)
        first = {k: v.clone() for k, v in taps.features.items()}
        unet(**b)
        assert all(torch.equal(taps.features[k], first[k]) for k in first)
        assert all(f.grad_fn is not None for f in taps.features.values())  # student features keep their graph
        assert all(f.grad_fn is None and not f.requires_grad for f in frozen.features.values())
        taps.reset()
        unet(**b)
        assert not torch.equal(taps.features[points[0].name], first[points[0].name])


def _distill_step(checkpointing: bool, sa_point: str):
    """One feature + output KD step of a tiny student against a tiny teacher; returns features, loss, grads."""
    teacher = tiny(seed=0)
    torch.manual_seed(1)
    student = build_student(TINY_UNET_CONFIG, get_spec("tiny-700m")).train()
    if checkpointing:
        student.enable_gradient_checkpointing()
    s_points = list_tap_points(student, ["sa", "ffn", "lf", "rb"])
    t_points = [p for p in list_tap_points(teacher, ["sa", "ffn", "lf", "rb"]) if p.name in {s.name for s in s_points}]
    x = unet_inputs(size=8)
    calls, handle = record_calls(student.get_submodule(SA))
    t_taps, s_taps = FeatureTaps(teacher, t_points, True, sa_point), FeatureTaps(student, s_points, sa_point=sa_point)
    with t_taps, s_taps:
        with torch.no_grad():
            t_out = teacher(**x).sample
        s_out = student(**x).sample
        loss = F.mse_loss(s_out, t_out) + sum(
            F.mse_loss(s_taps.features[n], t_taps.features[n]) for n in t_taps.features
        )
        loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in s_taps.features.items()}, loss.detach(), grads, len(calls), student


@pytest.mark.parametrize("sa_point", ["attn1", "residual"])
def test_gradient_checkpointing_gives_identical_features_loss_and_grads(sa_point):
    f0, l0, g0, calls0, _ = _distill_step(False, sa_point)
    f1, l1, g1, calls1, student = _distill_step(True, sa_point)
    assert calls0 == 1 and calls1 == 2  # the checkpointed block really ran again in backward
    assert torch.equal(l0, l1)
    assert f0.keys() == f1.keys() and all(torch.equal(f0[k], f1[k]) for k in f0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(student.parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_no_hooks_left_after_exit_even_on_error():
    unet = tiny()
    points = list_tap_points(unet)
    with FeatureTaps(unet, points, sa_point="residual"):
        assert not no_hooks_left(unet)
    assert no_hooks_left(unet)
    with pytest.raises(RuntimeError, match="boom"), FeatureTaps(unet, points, sa_point="residual"):
        unet(**unet_inputs(size=8))
        raise RuntimeError("boom")
    assert no_hooks_left(unet)


def test_hooks_only_on_tapped_modules_and_through_wrappers():
    unet = tiny()
    points = list_tap_points(unet, ["ca"], blocks=["up_blocks.1"])
    compiled = torch.compile(unet)  # not run: only the wrapper is unwrapped
    assert unwrap(compiled) is unet
    with FeatureTaps(compiled, points) as taps:
        hooked = {n for n, m in unet.named_modules() if m._forward_hooks or m._forward_pre_hooks}
        assert hooked == {p.name for p in points}
        with torch.no_grad():
            unet(**unet_inputs(size=8))
        assert set(taps.features) == hooked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = DDP(build_unet(TINY_UNET_CONFIG))
        points = list_tap_points(model, ["sa", "lf"])
        with FeatureTaps(model, points) as taps:
            out = model(**unet_inputs(batch=1, size=8, seed=rank)).sample
            loss = out.pow(2).mean() + sum(f.pow(2).mean() for f in taps.features.values())
            loss.backward()
            assert set(taps.features) == {p.name for p in points}
        assert no_hooks_left(model)
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_taps_capture_under_two_process_ddp():
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True)
