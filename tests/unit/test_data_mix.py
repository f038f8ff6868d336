"""Joint image-video training (`data.mix`): the spec and its one-line errors, the mixed loader
(sets drawn by weight, the same on every rank, exactly resumable, each set's own position), images
as one-frame clips of a video model (token grid, one-frame task masks, the DiT's one-frame path,
a temporal VAE's still clip)."""

from __future__ import annotations

import itertools

import pytest
import torch

from ditforge.data.loader import LatentLoader, Position
from ditforge.data.mix import MixedLoader, MixPosition, position_from_dict, source_names
from ditforge.models import tasks
from ditforge.models.dit import DiT, DiTConfig
from ditforge.objectives.flow import RectifiedFlow
from ditforge.spec import JobSpec, SpecError, build

from ..datasets import make_latents

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEO = {"name": "j", "data": {"train": "file:///d/clips", "frames": 8, "resolution": 16, "batch_size": 4}}
IMAGES = {"train": "file:///d/images", "weight": 0.5}


def spec(data: dict | None = None, **sections) -> JobSpec:
    d = {**VIDEO, **sections, "data": {**VIDEO["data"], **(data or {})}}
    return build(JobSpec, d, "j.yaml")  # type: ignore[return-value]


# ------------------------------------------------------------------------------ the spec


def test_spec_lists_each_set_with_its_settings():
    s = spec({"weight": 2, "mix": [{**IMAGES, "batch_size": 16, "labels": "drop"}]})
    first, images = s.data.sources()
    assert (first.train, first.weight, first.frames, first.resolution, first.batch_size) == (
        "file:///d/clips",
        2,
        8,
        16,
        4,
    )
    assert (images.frames, images.resolution, images.batch_size, images.labels) == (1, 16, 16, "drop")
    assert spec().data.sources()[0].train == "file:///d/clips" and len(spec().data.sources()) == 1


BAD = [
    ({"mix": [{**IMAGES, "weight": 0}]}, {}, "data.mix.0.weight: input should be greater than 0"),
    ({"mix": [{"train": "file:///d/images"}]}, {}, "data.mix.0.weight: required field is missing"),
    ({"mix": [{**IMAGES, "wieght": 1}]}, {}, "data.mix.0.wieght: unknown key (did you mean 'weight'?)"),
    ({"mix": [{**IMAGES, "train": "/d/images"}]}, {}, "data.mix.0.train: '/d/images' is not a URI"),
    ({"mix": [{**IMAGES, "labels": "maybe"}]}, {}, "data.mix.0.labels: 'maybe' is not allowed"),
    (
        {"mix": [{**IMAGES, "train": "file:///d/clips/"}]},
        {},
        "data.mix.0.train: file:///d/clips/ is already data.train",
    ),
    ({"mix": [IMAGES, IMAGES]}, {}, "data.mix.1.train: file:///d/images is already data.mix.0.train"),
    ({"frames": 1, "mix": [{**IMAGES, "frames": 8}]}, {}, "data.mix.0.frames: 8: an image job (data.frames 1)"),
    ({"batch_size": "auto", "mix": [IMAGES]}, {}, "data.batch_size: auto probes one data set"),
    ({"global_batch": 16, "mix": [IMAGES]}, {}, "data.global_batch: not with data.mix"),
    ({"mix": [IMAGES]}, {"resources": {"batch_policy": "global"}}, "resources.batch_policy: global accumulates"),
    ({"mix": [IMAGES]}, {"task": "vae", "vae": {"kind": "own", "path": "file:///v"}}, "data.mix: task 'vae'"),
    (
        {"mix": [{**IMAGES, "frames": 6}]},
        {"vae": {"kind": "own", "path": "file:///v", "temporal_downsample": 4}},
        "data.mix.0.frames: 6 is not a multiple of vae.temporal_downsample (4)",
    ),
    (
        {"mix": [{**IMAGES, "frames": 4}]},
        {"train": {"video_tasks": {"interpolate": 1, "k": [1, 2]}}},
        "train.video_tasks.k: interpolate with k up to 2 needs 5 latent frames; the clips of data.mix.0 have 4",
    ),
]


@pytest.mark.parametrize("data, sections, want", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_mix_is_one_line_naming_the_field(data, sections, want):
    with pytest.raises(SpecError) as e:
        spec(data, **sections)
    assert want in str(e.value), str(e.value)
    assert len(e.value.lines) == 1, e.value.lines


def test_a_short_video_set_in_the_mix_is_checked_like_data_train():
    with pytest.raises(
        SpecError,
        match=r"train.video_tasks: needs clips of at least 2 latent token frames \(data.mix.0.frames 2 gives 1\)",
    ):
        spec(
            {"mix": [{**IMAGES, "frames": 2}]},
            vae={"kind": "own", "path": "file:///v", "temporal_downsample": 2},
            train={"video_tasks": {"generate": 1}},
        )
    # images in a video-task job are fine: one-frame clips take the one-frame tasks
    assert spec({"mix": [IMAGES]}, train={"video_tasks": {"predict": 1}}).data.mix[0].frames == 1


# ------------------------------------------------------------------------------ the loader


@pytest.fixture
def two_sets(tmp_path):
    clips, images = f"file://{tmp_path}/clips", f"file://{tmp_path}/images"
    make_latents(clips, [12, 12, 12, 12], shapes=[(4, 3, 2, 2)])  # keys 000000..000047
    make_latents(images, [20, 20], shapes=[(4, 2, 2)])  # another key space: tell them by shape
    return clips, images


def mixed(two_sets, rank=0, world=2, seed=5, weights=(3.0, 1.0), drop=(False, True)) -> MixedLoader:
    clips, images = two_sets
    return MixedLoader(
        [LatentLoader(clips, 2, rank, world, seed), LatentLoader(images, 4, rank, world, seed)],
        weights,
        seed,
        drop_labels=drop,
        null_class=10,
    )


def take(loader, n):
    return [(tuple(x.shape), keys, y.tolist()) for x, y, keys, _ in itertools.islice(iter(loader), n)]


def test_sets_are_drawn_by_weight_the_same_on_every_rank(two_sets):
    a, b = mixed(two_sets, rank=0), mixed(two_sets, rank=1)
    picks = [a.source_of(n) for n in range(4000)]
    assert picks == [b.source_of(n) for n in range(4000)]  # every rank runs the same set at each step
    assert 0.72 < picks.count(0) / len(picks) < 0.78  # weights 3 : 1
    assert picks != [mixed(two_sets, seed=6).source_of(n) for n in range(4000)]  # the seed decides
    got_a, got_b = take(a, 40), take(b, 40)
    assert [s for s, _, _ in got_a] == [s for s, _, _ in got_b]  # the same shapes, step by step
    for n in (4, 5):  # each set's shards are split between the ranks: within an epoch no sample on both
        keys = [{k for s, ks, _ in got[:8] if len(s) == n for k in ks} for got in (got_a, got_b)]
        assert keys[0] and not keys[0] & keys[1]
    shapes = [s for s, _, _ in got_a]
    assert shapes == [(2, 4, 3, 2, 2) if a.source_of(n) == 0 else (4, 4, 2, 2) for n in range(40)]


def test_each_set_yields_its_own_stream_and_labels_follow_the_set(two_sets):
    clips, images = two_sets
    got = take(mixed(two_sets), 60)
    alone = [take(LatentLoader(u, bs, 0, 2, 5), 60) for u, bs in ((clips, 2), (images, 4))]
    for i, shape_len in ((0, 5), (1, 4)):
        mine = [(s, k) for s, k, _ in got if len(s) == shape_len]
        assert mine == [(s, k) for s, k, _ in alone[i][: len(mine)]]  # its own order, nothing skipped
    assert all(y == [10] * 4 for s, _, y in got if len(s) == 4)  # labels: drop → the null class
    assert any(y != [10] * 2 for s, _, y in got if len(s) == 5)  # labels kept


def test_resume_yields_exactly_the_uninterrupted_batches(two_sets):
    straight = take(mixed(two_sets), 70)  # past an epoch of both sets
    for stop in (1, 7, 23, 50):
        first = mixed(two_sets)
        head = take(first, stop)
        saved = first.position.to_dict()  # what the checkpoint holds
        assert saved["draws"] == stop and len(saved["sources"]) == 2
        resumed = mixed(two_sets)
        resumed.position = position_from_dict(saved)
        assert head + take(resumed, 70 - stop) == straight, f"resume after {stop} batches"
        assert resumed.draws_per_source()[0] + resumed.draws_per_source()[1] == 70


def test_positions_round_trip_and_a_one_set_checkpoint_goes_to_data_train(two_sets):
    p = Position(2, 3, 2, 2)
    assert position_from_dict(p.to_dict()) == p
    m = MixPosition(5, [p, Position(0, 1, 2, 4)])
    assert position_from_dict(m.to_dict()) == m
    loader = mixed(two_sets)
    loader.position = Position(0, 3, 2, 2)  # a checkpoint of the job before it mixed in images
    assert loader.position.draws == 0 and loader.position.sources[0].batch == 3
    assert loader.position.sources[1] == Position(0, 0, 2, 4)
    with pytest.raises(ValueError, match="covers 3 data sets"):
        loader.position = MixPosition(0, [p, p, p])


def test_source_names():
    assert source_names(["s3://b/a/clips-latents", "file:///x/images/"]) == ["clips-latents", "images"]
    assert source_names(["s3://b/a/l", "s3://b/c/l"]) == ["l-0", "l-1"]


# ------------------------------------------------------------------------------ images as one-frame clips


def test_one_frame_clips_draw_one_frame_tasks():
    assert tasks.token_grid((4, 8, 8), 2, 2) == (1, 4, 4)  # an image: one frame whatever patch_t
    gen = torch.Generator().manual_seed(0)
    given, picked = tasks.draw({"predict": 1, "complete": 1, "generate": 1}, (1, 3), 64, (1, 4, 4), gen)
    assert given.shape == (64, 1, 4, 4)
    assert {tasks.TASKS[i] for i in picked.tolist()} == {"generate", "complete"}
    for m, i in zip(given, picked.tolist()):
        assert (~m).any() and m.any() == (tasks.TASKS[i] == "complete")
    given, picked = tasks.draw({"predict": 1, "interpolate": 1}, (1, 3), 8, (1, 4, 4), gen)
    assert not given.any() and set(picked.tolist()) == {tasks.TASKS.index("generate")}


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_an_image_is_a_one_frame_clip_of_the_video_model(pos_embed):
    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=4, size="T", patch=2, patch_t=1, num_classes=3, pos_embed=pos_embed, given_tokens=True)
    model = DiT(cfg)
    for p in model.parameters():  # adaLN-Zero starts at zero output: make the comparison mean something
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])
    given = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    given[0, 0, 1:3, 1:3] = True
    image = model(x, t, y, given=given)
    clip = model(x.unsqueeze(2), t, y, given=given)  # the same image as a (C, 1, h, w) clip
    assert image.shape == x.shape
    torch.testing.assert_close(image, clip.squeeze(2))  # (RoPE: at t = 0; sin-cos: no temporal term)


def test_images_and_clips_train_the_same_model_with_a_temporal_patch():
    """patch_t 2: a clip's tokens are 2 frames deep; an image goes through the inflated one-frame
    kernel. Both take task masks and the loss; gradients reach the shared weights from both."""
    torch.manual_seed(0)
    model = DiT(
        DiTConfig(in_channels=4, size="T", patch=2, patch_t=2, num_classes=3, pos_embed="rope", given_tokens=True)
    )
    obj, gen = RectifiedFlow("uniform", 0.1), torch.Generator().manual_seed(0)
    weights = {"predict": 1.0, "complete": 1.0}
    for x in (torch.randn(3, 4, 4, 8, 8), torch.randn(5, 4, 8, 8)):
        given, _ = tasks.draw(weights, (1, 1), x.shape[0], tasks.token_grid(tuple(x.shape[1:]), 2, 2), gen)
        model.zero_grad()
        loss = obj.loss(model, x, {"y": torch.zeros(x.shape[0], dtype=torch.long)}, gen, given=given)
        loss.backward()
        assert torch.isfinite(loss) and model.final.linear.weight.grad.abs().sum() > 0  # (adaLN-Zero: the rest at 0)


def test_a_temporal_vae_encodes_an_image_as_a_still_clip():
    from ditforge.models.vae import KLAutoencoder, OwnVAE

    torch.manual_seed(0)
    vae = OwnVAE(KLAutoencoder(4, 8, downsample=2, temporal_downsample=2, video=True), scale=0.5, shift=0.1)
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    z = vae.encode(img)
    assert z.shape == (2, 4, 4, 4) == (2, *vae.latent_shape(4, 8, 8, frames=1))
    still = vae.encode(img.unsqueeze(2).expand(-1, -1, 2, -1, -1))  # (2, 4, 1, 4, 4)
    torch.testing.assert_close(z, still.squeeze(2))
    assert vae.decode(z).shape == img.shape
    assert vae.latent_shape(4, 8, 8, frames=8) == (4, 4, 4, 4)
