"""Session: start, choose, accept, undo, state/restore, determinism and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import disc_image

from SPASegmentationLib.errors import InputError
from SPASegmentationLib.metrics import dice
from SPASegmentationLib.session import Session, SessionState


@pytest.fixture(scope="module")
def model():
    """A model whose conditioning is perturbed so that samples differ (as after training)."""
    from SPASegmentationLib.model.build import build_model
    from SPASegmentationLib.model.spa import SPAConfig

    torch.manual_seed(1)
    m = build_model(SPAConfig())
    with torch.no_grad():
        for p in m.conditioning.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    m.invalidate_fingerprint()
    return m


def run_rounds(model, image, choices, seed=3, **kwargs):
    session = Session(model, image, seed=seed, n_samples=16, **kwargs)
    rounds = [session.start(box=(80, 50, 160, 130))]
    for k in choices:
        rounds.append(session.choose(min(k, rounds[-1].n_candidates - 1)))
    return session, rounds


def test_round_outputs_are_image_sized_and_consistent(model, ct_image):
    session, rounds = run_rounds(model, ct_image, [])
    r = rounds[0]
    h, w = ct_image.shape
    assert r.index == 1 and r.probability.shape == (h, w) and r.uncertainty.shape == (h, w)
    assert r.recommended.dtype == bool and np.array_equal(r.recommended, r.probability >= 0.5)
    assert 1 <= r.n_candidates <= 4 and r.candidates.shape == (r.n_candidates, h, w)
    assert r.differences.shape == r.candidates.shape
    assert np.array_equal(r.differences == 1, r.candidates & ~r.recommended[None])
    assert np.isclose(r.candidate_shares.sum(), 1.0) and np.isclose(r.mixture_weights.sum(), 1.0)
    # The structure (disc at 120, 90, radius 35) is found from the box.
    yy, xx = np.mgrid[:h, :w]
    inside = np.hypot(xx - 120, yy - 90) < 30
    assert r.recommended[inside].mean() > 0.9 and r.recommended[~np.hypot(xx - 120, yy - 90).__lt__(45)].mean() < 0.05


def test_rounds_are_deterministic_for_a_seed_and_differ_across_seeds(model, ct_image):
    _, a = run_rounds(model, ct_image, [0, 1], seed=5)
    _, b = run_rounds(model, ct_image, [0, 1], seed=5)
    _, c = run_rounds(model, ct_image, [0, 1], seed=6)
    assert all(np.array_equal(x.probability, y.probability) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0].probability, c[0].probability)


def test_choose_moves_the_mixture_and_counts_rounds(model, ct_image):
    session, rounds = run_rounds(model, ct_image, [0, 0])
    assert [r.index for r in rounds] == [1, 2, 3] and session.choices == [0, 0]
    with pytest.raises(InputError, match="does not exist"):
        session.choose(7)
    with pytest.raises(InputError, match="does not exist"):
        session.choose(-1)


def test_accept_undo_and_undo_to_an_earlier_round(model, ct_image):
    session, rounds = run_rounds(model, ct_image, [0, 0, 0])
    mask = session.accept()
    assert np.array_equal(mask, rounds[-1].recommended) and session.accepted
    with pytest.raises(InputError, match="accepted"):
        session.choose(0)
    back = session.undo()  # reopens the session one round back
    assert back.index == 3 and not session.accepted and np.array_equal(back.probability, rounds[2].probability)
    first = session.undo(to_round=1)
    assert first.index == 1 and session.choices == [] and np.array_equal(first.probability, rounds[0].probability)
    with pytest.raises(InputError, match="cannot undo"):
        session.undo(to_round=4)
    again = session.choose(0)
    assert np.array_equal(again.probability, rounds[1].probability)  # same choice, same round


def test_state_is_plain_json_and_restores_the_same_session(model, ct_image):
    session, rounds = run_rounds(model, ct_image, [1, 0])
    session.accept()
    state = json.loads(json.dumps(session.state().to_dict()))
    assert SessionState.from_dict(state) == session.state()  # the typed state survives its JSON
    restored = Session.restore(model, ct_image, state)
    assert restored.accepted and restored.choices == session.choices
    assert np.array_equal(restored.current.probability, rounds[-1].probability)
    assert np.array_equal(restored.current.candidates, rounds[-1].candidates)
    with pytest.raises(InputError, match="different image"):
        Session.restore(model, disc_image(seed=9), state)
    tampered = dict(state, model_fingerprint="0" * 16)
    with pytest.raises(InputError, match="made with model"):
        Session.restore(model, ct_image, tampered)
    with pytest.raises(InputError, match="not an SPA session"):
        Session.restore(model, ct_image, {"kind": "other"})
    with pytest.raises(InputError, match="damaged"):
        Session.restore(model, ct_image, {"kind": "spa-session", "schema_version": 1, "seed": 0})


def test_initial_weights_from_a_profile_are_used_for_the_first_round(model, ct_image):
    weights = np.zeros(16)
    weights[3] = 1.0
    session = Session(model, ct_image, seed=0, n_samples=8, initial_weights=weights)
    r = session.start(point=(120, 90))
    assert r.mixture_weights[3] == pytest.approx(1.0, abs=1e-4)  # π network is zero-initialised here
    with pytest.raises(InputError, match="initial mixture weights"):
        Session(model, ct_image, initial_weights=np.ones(3))


def test_a_precomputed_embedding_skips_encoding_and_gives_the_same_result(model, ct_image):

    embedding, _ = model.encode(ct_image)
    _, direct = run_rounds(model, ct_image, [0])
    session = Session(model, ct_image, seed=3, n_samples=16, embedding=embedding)
    first = session.start(box=(80, 50, 160, 130))
    assert np.array_equal(first.probability, direct[0].probability)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs a point"),
        ({"point": (500, 10)}, "outside the image"),
        ({"point": (10, -3)}, "outside the image"),
        ({"point": ("a", 1)}, "two numbers"),
        ({"point": (np.nan, 1)}, "not finite"),
        ({"box": (50, 50, 40, 60)}, "empty"),
        ({"box": (0, 0, 400, 60)}, "outside the image"),
        ({"box": (1, 2, 3)}, "four numbers"),
    ],
)
def test_bad_prompts_are_clear_errors(model, ct_image, kwargs, message):
    session = Session(model, ct_image, n_samples=4)
    with pytest.raises(InputError, match=message):
        session.start(**kwargs)


def test_using_a_session_before_start_is_a_clear_error(model, ct_image):
    session = Session(model, ct_image, n_samples=4)
    for call in (lambda: session.choose(0), session.accept, session.undo):
        with pytest.raises(InputError, match="has not started"):
            call()
    with pytest.raises(InputError, match="n_samples"):
        Session(model, ct_image, n_samples=0)


def _closeness_to_choices(rounds, choices):
    """Per choice: (Dice of the recommendation to the chosen candidate before, after)."""
    pairs = []
    for before, after, k in zip(rounds[:-1], rounds[1:], choices, strict=True):
        chosen = before.candidates[min(k, before.n_candidates - 1)]
        pairs.append((dice(before.recommended, chosen), dice(after.recommended, chosen)))
    return pairs


def test_the_minimal_anchor_never_moves_away_from_the_choice(shipped_model):
    """On a real LIDC crop, choosing the tightest candidate makes the shipped model's next recommendation drift
    away from it; the minimal anchor keeps every next recommendation at least as close to the choice."""
    from SPASegmentationLib.data.detect import open_dataset
    from SPASegmentationLib.simulation.preferences import consensus
    from SPASegmentationLib.simulation.prompts import initial_box

    case = open_dataset(Path(__file__).parent / "data" / "lidc-cimd").load("testing/43")
    box = initial_box(consensus(case.raters, ["label0", "label2", "label3"]))
    choices = [0, 0, 0]

    def run(anchor):
        # on the whole image (the drift this test needs shows there; in the focus window it does not here)
        session = Session(shipped_model, case.image, seed=0, anchor=anchor, focus="off")
        rounds = [session.start(box=box)]
        for k in choices:
            rounds.append(session.choose(k))
        return session, rounds

    _, free = run("none")
    session, anchored = run("minimal")
    assert all(r.anchor_weight == 0.0 for r in free)
    assert any(after < before for before, after in _closeness_to_choices(free, choices))  # the model drifts
    assert all(after >= before for before, after in _closeness_to_choices(anchored, choices))
    assert any(0.0 < r.anchor_weight for r in anchored[1:]) and all(0.0 <= r.anchor_weight <= 1.0 for r in anchored)
    assert np.array_equal(free[0].probability, anchored[0].probability)  # the first round has no choice to follow
    restored = Session.restore(shipped_model, case.image, json.loads(json.dumps(session.state().to_dict())))
    assert restored.anchor == "minimal" and np.array_equal(restored.current.probability, anchored[-1].probability)


def test_the_half_anchor_moves_every_sample_halfway(model, ct_image):
    session, rounds = run_rounds(model, ct_image, [1], anchor="half")
    assert rounds[1].anchor_weight == 0.5
    with pytest.raises(InputError, match="unknown choice anchor 'sideways'"):
        Session(model, ct_image, anchor="sideways")


def test_a_candidate_can_be_accepted_directly(model, ct_image):
    session, rounds = run_rounds(model, ct_image, [0])
    k = rounds[-1].n_candidates - 1
    mask = session.accept(k)
    assert np.array_equal(mask, rounds[-1].candidates[k]) and session.accepted and session.accepted_candidate == k
    state = session.state()
    assert state.accepted_candidate == k and SessionState.from_dict(state.to_dict()) == state
    assert Session.restore(model, ct_image, state).accepted_candidate == k
    session.undo()
    assert not session.accepted and session.accepted_candidate is None
    for bad in (9, -1, True, "1"):
        with pytest.raises(InputError, match="candidate"):
            session.accept(bad)


def test_a_lone_click_becomes_a_box_around_the_structure_under_it(shipped_model):
    """A click on a small bright structure: the box search finds a box that holds it and little else, and the
    round from it covers the structure; without the search the shipped model's answer to the click is worse."""
    image = disc_image(height=128, width=128, centre=(80, 44), radius=7.0)
    truth = np.hypot(*np.mgrid[:128, :128][::-1] - np.array([80, 44])[:, None, None]) < 7.0
    searched = Session(shipped_model, image, seed=0)
    found = searched.start(point=(80, 44))
    x0, y0, x1, y1 = searched.found_box
    assert x0 <= 74 and y0 <= 38 and x1 >= 86 and y1 >= 50  # holds the disc (radius 7 around (80, 44))
    assert x1 - x0 < 30 and y1 - y0 < 30  # and is sized to it, not to the image
    clicked = Session(shipped_model, image, seed=0, box_search=False)
    alone = clicked.start(point=(80, 44))
    assert clicked.found_box is None
    assert (
        dice(found.recommended, truth) > 0.7 and dice(found.recommended, truth) > dice(alone.recommended, truth) + 0.2
    )
    state = searched.state()
    assert state.box_search and SessionState.from_dict(state.to_dict()) == state
    restored = Session.restore(shipped_model, image, json.loads(json.dumps(state.to_dict())))
    assert restored.found_box == searched.found_box
    assert np.array_equal(restored.current.probability, found.probability)
    # a state written before the search existed replays the way it was made: the click alone
    old = {k: v for k, v in state.to_dict().items() if k not in ("box_search", "focus")}
    replayed = Session.restore(shipped_model, image, old)
    assert not replayed.box_search and np.array_equal(replayed.current.probability, alone.probability)


def test_the_box_search_leaves_boxes_and_negative_clicks_alone(model, ct_image):
    session = Session(model, ct_image, seed=0)
    session.start(box=(80, 50, 160, 130))
    assert session.found_box is None
    session.start(point=(120, 90), box=(80, 50, 160, 130))
    assert session.found_box is None
    session.start(point=(10, 10), label=False)
    assert session.found_box is None


def test_a_small_structure_is_segmented_in_a_magnified_window(shipped_model):
    """focus "all": a box around a real nodule moves the rounds into a window four times the box's size, magnified
    to the model's input; every mask still comes at the image's size (nothing outside the window), the whole image
    is never encoded, its intensity scale is kept, and the state replays it. The default ("clicks") and "off" keep a
    given box on the whole image; old states use the whole image."""
    from SPASegmentationLib.data.detect import open_dataset
    from SPASegmentationLib.embeddings import EmbeddingCache
    from SPASegmentationLib.model.preprocess import intensity_window
    from SPASegmentationLib.simulation.preferences import consensus
    from SPASegmentationLib.simulation.prompts import initial_box

    case = open_dataset(Path(__file__).parent / "data" / "lidc-cimd").load("training/19")
    target = consensus(case.raters, sorted(case.raters))
    box = initial_box(target)
    cache = EmbeddingCache(shipped_model)
    focused = Session(shipped_model, case.image, seed=0, embeddings=cache, focus="all")
    rounds = [focused.start(box=box)]
    rounds.append(focused.choose(0))
    window = focused.focus_window
    assert window is not None and window.contains(np.array(box).reshape(2, 2))
    assert window.width == window.height < 0.75 * case.image.shape[1]
    assert not cache.contains(case.image) and cache.contains(window.crop(case.image), intensity_window(case.image))
    outside = np.ones(case.image.shape[:2], bool)
    outside[window.top : window.top + window.height, window.left : window.left + window.width] = False
    for r in rounds:
        assert r.probability.shape == case.image.shape[:2] and r.candidates.shape[1:] == case.image.shape[:2]
        assert r.probability[outside].max() == 0.0 and not r.candidates[:, outside].any()
    assert dice(rounds[0].recommended, target) > 0.75
    for mode in ("off", "clicks"):
        whole = Session(shipped_model, case.image, seed=0, focus=mode)
        whole.start(box=box)
        assert whole.focus_window is None and whole.state().focus == mode
    state = focused.state()
    assert state.focus == "all" and SessionState.from_dict(state.to_dict()) == state
    restored = Session.restore(shipped_model, case.image, json.loads(json.dumps(state.to_dict())))
    assert restored.focus_window == window and np.array_equal(restored.current.probability, rounds[-1].probability)
    old = {k: v for k, v in state.to_dict().items() if k != "focus"}  # written before the focus window existed
    assert Session.restore(shipped_model, case.image, old).focus_window is None


def test_the_focus_window_keeps_a_ct_images_intensity_scale_and_leaves_large_structures_alone(model, ct_image):
    small = disc_image(height=200, width=200, centre=(60, 140), radius=5.0)
    session = Session(model, small, seed=0, n_samples=8, focus="all")
    session.start(point=(60, 140), box=(54, 134, 66, 146))
    window = session.focus_window
    assert window is not None and window.contains(np.array([60, 140]))
    crop_embedding, _ = session._view
    from SPASegmentationLib.model.preprocess import intensity_window

    expected, _ = model.encode(window.crop(small), intensity_window(small))
    assert torch.allclose(crop_embedding, expected)
    # a click outside the window given with the box: the whole image, so the click stays in the picture
    session.start(point=(150, 20), box=(54, 134, 66, 146))
    assert session.focus_window is None
    session.start(box=(80, 50, 160, 130))  # 80 px of 240: the window would span the image
    assert session.focus_window is None
    with pytest.raises(InputError, match="unknown focus mode 'on'"):
        Session(model, small, focus="on")


def test_a_click_the_whole_image_finds_no_box_for_is_looked_at_closer(shipped_model):
    """A real nodule against a vessel (LIDC crop): in the whole image the box search finds nothing and the click
    alone covers the vessels; the default focus ("clicks") answers the click in a magnified window around it."""
    from SPASegmentationLib.data.detect import open_dataset
    from SPASegmentationLib.simulation.preferences import consensus, fixed_preferences
    from SPASegmentationLib.simulation.prompts import evaluation_first_prompt

    case = open_dataset(Path(__file__).parent / "data" / "lidc-cimd").load("training/8")
    target = consensus(case.raters, fixed_preferences({"training/8": case.raters}, 0)["training/8"])
    point = evaluation_first_prompt(case.raters, target, "point")["point"]
    closer = Session(shipped_model, case.image, seed=0)
    near = closer.start(point=point)
    window = closer.focus_window
    assert closer.focus == "clicks" and closer.found_box is None
    assert window is not None and window.contains(np.array(point)) and window.width == window.height == 48
    whole = Session(shipped_model, case.image, seed=0, focus="off")
    alone = whole.start(point=point)
    assert whole.found_box is None and whole.focus_window is None
    assert dice(near.recommended, target) > 0.45 > 0.2 > dice(alone.recommended, target)
    restored = Session.restore(shipped_model, case.image, json.loads(json.dumps(closer.state().to_dict())))
    assert restored.focus_window == window and np.array_equal(restored.current.probability, near.probability)


def test_a_bfloat16_round_stays_close_to_float32_and_keeps_a_float32_mixture(shipped_model):
    """Half-precision rounds (GPU servers: --round-precision) change masks slightly, never the mixture's type: the
    weights a profile saves stay float32 and sum to one. float16 is refused off a GPU, with the fix."""
    image = disc_image()
    try:
        rounds = {}
        for precision in ("float32", "bfloat16"):
            shipped_model.use_round_precision(precision)
            rounds[precision] = Session(shipped_model, image, seed=3, n_samples=12).start(box=(80, 50, 160, 130))
        half = rounds["bfloat16"]
        assert np.abs(half.probability - rounds["float32"].probability).max() < 0.1
        assert dice(half.recommended, rounds["float32"].recommended) > 0.95
        assert half.mixture_weights.dtype == np.float64 and abs(half.mixture_weights.sum() - 1.0) < 1e-6
        with pytest.raises(InputError, match="float16 rounds need a CUDA GPU"):
            shipped_model.use_round_precision("float16")
    finally:
        shipped_model.use_round_precision("float32")
