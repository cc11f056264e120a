"""Tests for ld3m.augment (Differentiable Siamese Augmentation)."""

from __future__ import annotations

import pytest
import torch

from ld3m.augment import DSA, FAMILIES, DSAParams

STRATEGY = "_".join(FAMILIES)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 3, c: int = 3, h: int = 12, w: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=_gen(seed))


def _params(family: str, value: torch.Tensor) -> DSAParams:
    return DSAParams(families=(family,), values={family: value}, n=value.shape[0])


def _row(params: DSAParams, i: int) -> DSAParams:
    return DSAParams(params.families, {k: v[i : i + 1] for k, v in params.values.items()}, 1)


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("strategy", ["color_blur", "crop__zoom", "Rotate90"])
def test_unknown_family_raises(strategy: str) -> None:
    with pytest.raises(ValueError, match="Unknown DSA augmentation family"):
        DSA(strategy)


def test_unknown_mode_raises() -> None:
    with pytest.raises(ValueError, match="mode"):
        DSA(STRATEGY, mode="X")


@pytest.mark.parametrize("strategy", ["", "none", "None"])
def test_disabled_is_identity(strategy: str) -> None:
    dsa = DSA(strategy)
    x = _images()
    assert not dsa.enabled
    assert torch.equal(dsa(x, generator=_gen()), x)
    a, b = dsa.siamese(x, x[:1], generator=_gen())
    assert torch.equal(a, x) and torch.equal(b, x[:1])


# -------------------------------------------------------------------- sampling
def test_sampled_values_in_range() -> None:
    h, w = 28, 32
    params = DSA(STRATEGY, mode="M").sample(256, (h, w), _gen(3))
    assert params.families == FAMILIES and params.n == 256
    v = params.values
    assert all(t.shape[0] == 256 for t in v.values())
    assert v["rotate"].abs().max() <= 15.0 and v["rotate"].abs().max() > 10.0
    assert v["scale"].min() >= 1 / 1.2 and v["scale"].max() <= 1.2
    # round(0.125 * 32) = 4 and round(0.125 * 28) = round(3.5) = 4; both extremes are reached
    dx, dy = v["crop"][:, 0], v["crop"][:, 1]
    assert dx.min() == -4 and dx.max() == 4 and dy.min() == -4 and dy.max() == 4
    # the authors' randint(0, side + (1 - size % 2)): squares of 16 and 14 px (even), so the
    # centre reaches the far edge itself
    cx, cy = v["cutout"][:, 0], v["cutout"][:, 1]
    assert cx.min() == 0 and cx.max() == w and cy.min() == 0 and cy.max() == h
    assert v["color"].min() >= 0 and v["color"].max() < 1
    assert v["flip"].dtype == torch.bool and 0 < v["flip"].sum() < 256


def test_crop_range_small_image() -> None:
    shifts = DSA("crop").sample(200, (8, 16), _gen()).values["crop"]
    assert shifts[:, 0].abs().max() == 2 and shifts[:, 1].abs().max() == 1


def test_same_seed_same_params_different_seed_differs() -> None:
    dsa = DSA(STRATEGY, mode="M")
    p1, p2 = dsa.sample(4, (12, 12), _gen(7)), dsa.sample(4, (12, 12), _gen(7))
    p3 = dsa.sample(4, (12, 12), _gen(8))
    assert p1.families == p2.families
    assert all(torch.equal(p1.values[f], p2.values[f]) for f in FAMILIES)
    assert any(not torch.equal(p1.values[f], p3.values[f]) for f in FAMILIES)


def test_mode_s_family_choice_comes_from_generator() -> None:
    dsa = DSA(STRATEGY)
    gen_a, gen_b = _gen(5), _gen(5)
    chosen_a = [dsa.sample(1, (8, 8), gen_a).families for _ in range(60)]
    chosen_b = [dsa.sample(1, (8, 8), gen_b).families for _ in range(60)]
    assert chosen_a == chosen_b
    assert all(len(f) == 1 for f in chosen_a)
    assert {f[0] for f in chosen_a} == set(FAMILIES)


def test_global_rng_untouched_with_generator() -> None:
    state = torch.get_rng_state()
    dsa = DSA(STRATEGY, mode="M")
    x = _images()
    gen = _gen()
    dsa(x, generator=gen)
    dsa.siamese(x, x, generator=gen)
    dsa.apply(x, dsa.sample(1, (12, 12), gen))
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------- replaying
@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_replay_across_batch_sizes(family: str) -> None:
    dsa = DSA(family)
    a = _images(2, seed=1)
    b = torch.cat([a[:1], _images(4, seed=2)])
    for seed in range(4):
        params = dsa.sample(1, (12, 12), _gen(seed))
        assert params.families == (family,)
        out_a, out_b = dsa.apply(a, params), dsa.apply(b, params)
        assert out_a.shape == a.shape and out_b.shape == b.shape
        torch.testing.assert_close(out_a[0], out_b[0], rtol=0, atol=1e-6)
        # siamese() uses one shared draw from the generator: same as sample + apply
        sa, sb = dsa.siamese(a, b, generator=_gen(seed))
        assert torch.equal(sa, out_a) and torch.equal(sb, out_b)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_params_match_shared_path(family: str) -> None:
    """Vectorised per-sample application == applying each row to its image alone."""
    dsa = DSA(family)
    x = _images(6, h=10, w=12)
    params = dsa.sample(6, (10, 12), _gen(11))
    out = dsa.apply(x, params)
    assert torch.equal(out, dsa.apply(x, params))  # deterministic replay
    for i in range(6):
        torch.testing.assert_close(
            out[i : i + 1], dsa.apply(x[i : i + 1], _row(params, i)), rtol=0, atol=1e-5
        )


def test_call_draws_independent_params_from_generator() -> None:
    dsa = DSA(STRATEGY, mode="M")
    x = _images(4)
    expected = dsa.apply(x, dsa.sample(4, (12, 12), _gen(2)))
    assert torch.equal(dsa(x, generator=_gen(2)), expected)


def test_n_mismatch_raises() -> None:
    dsa = DSA("rotate")
    with pytest.raises(ValueError, match="n=2"):
        dsa.apply(_images(3), dsa.sample(2, (12, 12), _gen()))


def test_mode_m_applies_all_families_in_order() -> None:
    dsa = DSA(STRATEGY, mode="M")
    x = _images(3)
    params = dsa.sample(3, (12, 12), _gen(4))
    assert params.families == FAMILIES
    expected = x
    for family in FAMILIES:
        expected = dsa.apply(expected, _params(family, params.values[family]))
    assert torch.equal(dsa.apply(x, params), expected)


def test_params_to_returns_copy() -> None:
    params = DSA(STRATEGY, mode="M").sample(2, (12, 12), _gen())
    moved = params.to("cpu")
    assert moved is not params and moved.n == 2 and moved.families == params.families
    assert all(torch.equal(moved.values[f], params.values[f]) for f in FAMILIES)


# --------------------------------------------------------------- each family
@pytest.mark.parametrize("n", [1, 2])
def test_crop_moves_one_hot_pixel(n: int) -> None:
    x = torch.zeros(2, 1, 7, 9)
    x[:, 0, 3, 4] = 1.0
    dsa = DSA("crop")
    for dx, dy in [(1, 0), (0, -2), (-3, 1)]:
        out = dsa.apply(x, _params("crop", torch.tensor([[dx, dy]] * n)))
        expected = torch.zeros_like(x)
        expected[:, 0, 3 + dy, 4 + dx] = 1.0
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2])
def test_crop_zero_fills_vacated_pixels(n: int) -> None:
    x = torch.ones(2, 2, 6, 6)
    out = DSA("crop").apply(x, _params("crop", torch.tensor([[2, -1]] * n)))
    assert torch.all(out[..., :, :2] == 0) and torch.all(out[..., -1:, :] == 0)
    assert torch.all(out[..., :-1, 2:] == 1)


def test_flip_matches_torch_flip() -> None:
    x = _images(3)
    dsa = DSA("flip")
    assert torch.equal(
        dsa.apply(x, _params("flip", torch.tensor([True]))), torch.flip(x, dims=[-1])
    )
    assert torch.equal(dsa.apply(x, _params("flip", torch.tensor([False]))), x)
    out = dsa.apply(x, _params("flip", torch.tensor([True, False, True])))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    assert torch.equal(out[2], x[2].flip(-1))


def test_color_identity_and_formula() -> None:
    x = _images(2)
    dsa = DSA("color")
    torch.testing.assert_close(dsa.apply(x, _params("color", torch.full((1, 3), 0.5))), x)
    u = torch.tensor([[0.9, 0.2, 0.1]])
    y = x + 0.4
    m = y.mean(dim=1, keepdim=True)
    y = (y - m) * 0.4 + m
    m = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - m) * 0.6 + m
    torch.testing.assert_close(dsa.apply(x, _params("color", u)), y)


def test_cutout_zeroes_clipped_square() -> None:
    x = torch.ones(2, 1, 8, 10)
    # side 4 x 5; centre (cx=0, cy=7) -> rows 5..7, cols 0..2 (clipped at the borders)
    out = DSA("cutout").apply(x, _params("cutout", torch.tensor([[0, 7], [5, 4]])))
    expected = torch.ones_like(x)
    expected[0, :, 5:, :3] = 0
    expected[1, :, 2:6, 3:8] = 0
    assert torch.equal(out, expected)


def test_identity_geometric_params() -> None:
    x = _images(2)
    torch.testing.assert_close(
        DSA("rotate").apply(x, _params("rotate", torch.zeros(1))), x, rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        DSA("scale").apply(x, _params("scale", torch.ones(2, 2))), x, rtol=0, atol=1e-5
    )


def test_rotate_90_is_counter_clockwise() -> None:
    x = _images(1, h=6, w=6)
    out = DSA("rotate").apply(x, _params("rotate", torch.tensor([90.0])))
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), rtol=0, atol=1e-4)


def test_scale_magnifies_by_the_inverse_factor() -> None:
    """As the authors': s is the affine grid's output-to-input map, so the content is magnified
    by 1 / s (s = 1.5: a pixel 3 px right of the centre lands 2 px right of it)."""
    x = torch.zeros(1, 1, 9, 9)
    x[..., 4, 4] = 1.0
    x[..., 4, 7] = 1.0
    out = DSA("scale").apply(x, _params("scale", torch.tensor([[1.5, 1.0]])))
    assert out[0, 0, 4, 4] == pytest.approx(1.0, abs=1e-5)  # the centre is fixed
    assert out[0, 0, 4, 6] == pytest.approx(1.0, abs=1e-5)
    assert out[0, 0, 4, 7] == pytest.approx(0.0, abs=1e-5)


def test_scale_magnification_distribution() -> None:
    """s ~ U[1/1.2, 1.2] and magnification 1 / s: mean ln(1.44) / (1.2 - 1/1.2) = 0.9945, zoomed
    in (1 / s > 1) with probability (1 - 1/1.2) / (1.2 - 1/1.2) = 0.4545."""
    s = DSA("scale").sample(100_000, (32, 32), _gen(5)).values["scale"].flatten()
    magnification = 1 / s
    assert magnification.mean().item() == pytest.approx(0.9945, abs=0.002)
    assert (magnification > 1).float().mean().item() == pytest.approx(0.4545, abs=0.005)


# ------------------------------------------------------- gradients and dtypes
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_input(family: str, n: int) -> None:
    dsa = DSA(family)
    x = _images(3).requires_grad_(True)
    out = dsa.apply(x, dsa.sample(n, (12, 12), _gen(6)))
    (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_cutout_gradient_zero_exactly_inside() -> None:
    x = _images(2, h=8, w=8).requires_grad_(True)
    params = _params("cutout", torch.tensor([[2, 3], [7, 0]]))
    DSA("cutout").apply(x, params).sum().backward()
    inside = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    inside[0, :, 1:5, 0:4] = True
    inside[1, :, 0:2, 5:8] = True
    inside = inside.expand_as(x)
    assert torch.all(x.grad[inside] == 0) and torch.all(x.grad[~inside] != 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_output_keeps_input_dtype(dtype: torch.dtype) -> None:
    dsa = DSA(STRATEGY, mode="M")
    x = _images(2).to(dtype)
    for n in (1, 2):
        out = dsa.apply(x, dsa.sample(n, (12, 12), _gen(n)))
        assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()


def test_autocast_keeps_dtype() -> None:
    dsa = DSA(STRATEGY, mode="M")
    x = _images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dsa(x, generator=_gen())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
