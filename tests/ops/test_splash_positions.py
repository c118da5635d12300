"""The TPU training kernel (splash attention, interpret mode) and runtime positions: positions
its index mask honours run and equal the XLA reference, all others are refused (before any
kernel when concrete, from the running computation under jit), never silently masked otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.ops import masks, pallas_tpu
from tests.ops import pallas_cases as cases

BLOCKS = pallas_tpu.SplashBlocks(128, 128, 128, 128)
B = 4


def _row(kind: str, offsets, lengths, pad_positions=None):
    """Positions / segment ids [1, 2L or L]: segments of `lengths` with positions = index within
    the half minus `offsets[s]`; a trailing padding segment 0 (`pad_positions`)."""
    pos, seg = [], []
    start = 0
    for s, (offset, n) in enumerate(zip(offsets, lengths), start=1):
        pos += list(range(start - offset, start - offset + n))
        seg += [s] * n
        start += n
    if pad_positions is not None:
        pos += list(pad_positions)
        seg += [0] * len(pad_positions)
    pos, seg = np.asarray([pos], np.int32), np.asarray([seg], np.int32)
    if kind == "block_diffusion":
        pos, seg = np.concatenate([pos, pos], 1), np.concatenate([seg, seg], 1)
    return pos, seg


def _index_mask_is_the_runtime_mask(spec, pos, seg) -> bool:
    """The independent reference: the splash mask (mask_fn on row indices, plus segments) equals
    mask_fn on the runtime positions, compared densely."""
    length = pos.shape[1]
    index = pallas_tpu.IndexMask(spec, length, length // 2)[:, :]
    same = seg[0][:, None] == seg[0][None, :]
    runtime = np.asarray(masks.dense_mask(spec, jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg),
                                          jnp.asarray(seg)))[0]
    return bool(np.array_equal(index & same, runtime))


def test_accepted_rows_are_exactly_the_rows_whose_masks_agree():
    """Random rows (per-segment offsets, zero or counting row-padding positions, a segment id used
    twice): canonical_rows never accepts a row whose index mask differs from the runtime mask;
    the data pipeline's rows (examples restarting at 0 on block boundaries) are accepted."""
    rng = np.random.default_rng(0)
    accepted = refused = 0
    for spec in (masks.block_diffusion(B), masks.block_causal(B), masks.causal()):
        for _ in range(40):
            lengths = [B * int(n) for n in rng.permutation([1, 2, 3])]  # few shapes: few compilations
            offsets = [int(o) for o in rng.choice([0, B, 2 * B, -B, 1, 3], size=3)]
            pad = [np.arange(2 * B), np.zeros(2 * B, int)][int(rng.integers(0, 2))]
            pos, seg = _row(spec.kind, offsets, lengths, pad)
            if rng.random() < 0.3:  # segment id 1 used twice, apart
                seg = np.where(seg == 3, 1, seg)
            ok = bool(pallas_tpu.canonical_rows(spec, pos, pos, seg, seg)[0])
            agree = _index_mask_is_the_runtime_mask(spec, pos, seg)
            assert not ok or agree, (spec, offsets, lengths, pad)
            accepted += ok
            refused += not ok
    assert accepted > 20 and refused > 20
    for spec in (masks.block_diffusion(B), masks.block_causal(B), masks.causal()):
        pos, seg = _row(spec.kind, [0, 8, 20], [8, 12, 4], pad_positions=np.arange(8))
        assert bool(pallas_tpu.canonical_rows(spec, pos, pos, seg, seg)[0])


def _qkv_for(pos):
    q, k, v, dout = cases.qkv(3, 1, pos.shape[1], pos.shape[1], 2, 1, 32, jnp.float32)
    return q, k, v, dout


def test_honoured_positions_equal_the_reference():
    """A causal row whose positions are index + 3 (one offset, not a block multiple: causal
    needs none) and block-diffusion segments restarting at 0: splash equals XLA."""
    for spec, (pos, seg) in [
        (masks.causal(), _row("causal", [-3, 0], [64, 64])),
        (masks.block_diffusion(B), _row("block_diffusion", [0, 32], [32, 24], pad_positions=np.arange(8))),
    ]:
        q, k, v, dout = _qkv_for(pos)
        ids = masks.AttentionMask.self_attention(spec, jnp.asarray(pos), jnp.asarray(seg))
        got = cases.output_and_grads(
            lambda q, k, v: pallas_tpu.splash_attention(
                q, k, v, mask=spec, positions=ids.q_positions, segment_ids=ids.q_segment_ids,
                blocks=BLOCKS, interpret=True), q, k, v, dout)
        assert max(cases.max_errors(got, cases.reference(q, k, v, dout, ids))) < 1e-5, spec


REFUSED = [
    pytest.param(masks.block_diffusion(B), _row("block_diffusion", [0, 30], [32, 32]), id="offset-not-block-multiple"),
    pytest.param(masks.block_diffusion(B), _row("block_diffusion", [0, 32], [32, 24], np.zeros(8, int)),
                 id="zero-padding-positions"),
    pytest.param(masks.causal(), (np.arange(64, dtype=np.int32)[None, ::-1].copy(), np.ones((1, 64), np.int32)),
                 id="causal-reversed"),
]


@pytest.mark.parametrize("spec, row", REFUSED)
def test_refused_before_any_kernel_runs(spec, row, monkeypatch):
    pos, seg = row
    q, k, v, _ = _qkv_for(pos)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel was built for refused positions")

    monkeypatch.setattr(pallas_tpu, "_splash_kernel", no_kernel)
    with pytest.raises(pallas_tpu.PositionsError, match=r"rows \[0\] of the batch .* cannot honour") as info:
        pallas_tpu.splash_attention(q, k, v, mask=spec, positions=jnp.asarray(pos),
                                    segment_ids=jnp.asarray(seg), blocks=BLOCKS, interpret=True)
    assert "\n" not in str(info.value) and spec.kind in str(info.value)


def test_refused_under_jit_from_the_running_computation():
    """Traced positions: the device-side check's host callback fails the computation; canonical
    positions through the same compiled program run."""
    spec = masks.block_diffusion(B)
    good, seg = _row("block_diffusion", [0, 32], [32, 32])
    bad, _ = _row("block_diffusion", [0, 30], [32, 32])
    q, k, v, _ = _qkv_for(good)
    run = jax.jit(lambda q, k, v, pos, seg: pallas_tpu.splash_attention(
        q, k, v, mask=spec, positions=pos, segment_ids=seg, blocks=BLOCKS, interpret=True))
    run(q, k, v, jnp.asarray(good), jnp.asarray(seg)).block_until_ready()
    with pytest.raises(Exception, match=r"splash_attention: rows \[0\] of this device's batch"):
        run(q, k, v, jnp.asarray(bad), jnp.asarray(seg)).block_until_ready()
