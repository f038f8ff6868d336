"""Video tasks by mask modeling (VDT): the task masks, the objectives' treatment of given tokens,
the DiT's given embedding in every attention / position / conditioning variant, and samplers that
keep given tokens clean."""

from __future__ import annotations

import pytest
import torch

from ditforge.models import tasks
from ditforge.models.dit import DiT, DiTConfig
from ditforge.objectives.common import given_latents
from ditforge.objectives.ddpm import DDPM
from ditforge.objectives.flow import RectifiedFlow
from ditforge.objectives.samplers import sample

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = (4, 4, 4)  # (gt, gh, gw) tokens of (C, 4, 8, 8) latents at patch 2


def test_frame_task_masks():
    m = lambda task, k=1: tasks.frame_mask(task, 6, k).tolist()  # noqa: E731
    assert m("predict", 2) == [True, True, False, False, False, False]
    assert m("predict_backward", 2) == [False, False, False, False, True, True]
    assert m("interpolate", 1) == [True, False, False, False, False, True]
    assert m("image_to_video") == [True, False, False, False, False, False]
    assert m("generate") == [False] * 6


@pytest.mark.parametrize("task", tasks.TASKS)
def test_drawn_masks_leave_something_given_and_something_to_generate(task):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = tasks.draw_one(task, GRID, (1, 3), gen)
        assert m.shape == GRID and m.dtype == torch.bool
        assert (~m).any()  # the loss always has tokens to count
        assert m.any() == (task != "generate")
        if task in tasks.FRAME_TASKS:  # whole frames: the same answer at every position of a frame
            assert torch.equal(m, m[:, :1, :1].expand_as(m))
        if task == "interpolate":
            assert m[0].all() and m[-1].all()


def test_draw_follows_the_weights_and_the_generator():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, ta = tasks.draw({"predict": 0.5, "complete": 0.5}, (1, 2), 64, GRID, g1)
    b, tb = tasks.draw({"predict": 0.5, "complete": 0.5}, (1, 2), 64, GRID, g2)
    assert torch.equal(a, b) and torch.equal(ta, tb)  # same seed, same masks: resume stays exact
    names = {tasks.TASKS[i] for i in ta.tolist()}
    assert names == {"predict", "complete"}
    _, only = tasks.draw({"interpolate": 1.0, "generate": 0.0}, (1, 1), 8, GRID, g1)
    assert set(only.tolist()) == {tasks.TASKS.index("interpolate")}


def test_given_latents_covers_each_tokens_block():
    given = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    given[0, 1, 0, 1] = True  # frame 1, row 0, column 1
    g = given_latents(given, torch.zeros(1, 3, 4, 4, 4))  # patch_t 2, patch 2
    assert g.shape == (1, 1, 4, 4, 4)
    assert g.sum() == 2 * 2 * 2 and g[0, 0, 2:4, 0:2, 2:4].all()


class Recorder(torch.nn.Module):
    """A stand-in network: remembers its input, predicts zeros (so the loss is the target's energy)."""

    def forward(self, x, t, drop=None, mask_ratio=0.0, gen=None, given=None, **cond):
        self.x, self.given = x, given
        return torch.zeros_like(x)


@pytest.mark.parametrize("objective", [RectifiedFlow("uniform", 0.0), DDPM("eps", "linear", 100, 0.0)])
def test_given_tokens_enter_clean_and_the_loss_counts_generated_ones_only(objective):
    x0 = torch.randn(2, 3, 4, 8, 8)
    given = torch.zeros(2, *GRID, dtype=torch.bool)
    given[:, :2] = True  # predict: the first two latent frames
    net = Recorder()
    loss = objective.loss(net, x0, {}, torch.Generator().manual_seed(0), given=given)
    assert torch.equal(net.x[:, :, :2], x0[:, :, :2])  # clean, whatever t was drawn
    assert not torch.allclose(net.x[:, :, 2:], x0[:, :, 2:])  # the rest is noised
    assert net.given is given
    # The same draws without a mask: the loss over all tokens differs from the masked one, and the
    # masked one equals the mean over the generated frames alone.
    full = objective.loss(Recorder(), x0, {}, torch.Generator().manual_seed(0))
    assert not torch.isclose(loss, full)
    changed = x0.clone()
    changed[:, :, :2] += 100.0  # given content changes the input, but never the loss's targets...
    if isinstance(objective, RectifiedFlow):  # ...for flow the target is ε - x0: only generated x0 counts
        l2 = objective.loss(Recorder(), changed, {}, torch.Generator().manual_seed(0), given=given)
        assert torch.isclose(loss, l2)


def test_patch_masking_and_given_tokens_compose():
    """MicroDiT drops spatial positions (given or not); the loss counts kept ∧ generated."""
    torch.manual_seed(0)
    net = DiT(DiTConfig(in_channels=3, size="T", num_classes=0, given_tokens=True))
    x0 = torch.randn(2, 3, 4, 8, 8)
    given = torch.zeros(2, *GRID, dtype=torch.bool)
    given[:, 0] = True
    loss = RectifiedFlow("uniform", 0.0).loss(
        net, x0, {}, torch.Generator().manual_seed(0), mask_ratio=0.5, given=given
    )
    loss.backward()
    assert torch.isfinite(loss) and net.given_embed.grad is not None


VARIANTS = [
    dict(video_attention="full", pos_embed="sincos"),
    dict(video_attention="factorised", pos_embed="rope"),
    dict(video_attention="factorised", pos_embed="sincos", text="own", text_len=8),
    dict(video_attention="full", pos_embed="rope", patch_t=2),
]


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("objective", [RectifiedFlow("uniform", 0.5), DDPM("v", "cosine", 100, 0.5)])
def test_dit_trains_with_given_tokens_in_every_variant(kw, objective):
    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=3, size="T", num_classes=4, given_tokens=True, **kw)
    net = DiT(cfg)
    gt = 4 // cfg.patch_t
    x0 = torch.randn(2, 3, 4, 8, 8)
    gen = torch.Generator().manual_seed(0)
    given, _ = tasks.draw({"predict": 1.0, "complete": 1.0}, (1, 1), 2, (gt, 4, 4), gen)
    cond = {"y": torch.tensor([1, 2])}
    if cfg.text == "own":
        from ditforge.models.dit import tokenize_bytes

        cond["text"] = tokenize_bytes(["a red ring", "a blue star"], 8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(2):
        loss = objective.loss(net, x0, cond, gen, given=given)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    # The model tells given tokens from generated ones: marking a token given changes the prediction.
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        a = net(x0, t, **cond, given=given)
        b = net(x0, t, **cond, given=torch.zeros_like(given))
    assert not torch.allclose(a, b)


def test_model_without_given_tokens_refuses_a_mask():
    net = DiT(DiTConfig(in_channels=3, size="T", num_classes=0))
    with pytest.raises(ValueError, match="given_tokens"):
        net(torch.randn(1, 3, 4, 8, 8), torch.zeros(1), given=torch.zeros(1, *GRID, dtype=torch.bool))


@pytest.mark.parametrize(
    "kind,sampler", [("rectified_flow", "euler"), ("rectified_flow", "heun"), ("ddpm", "ddim"), ("ddpm", "ddpm")]
)
def test_samplers_keep_given_tokens_clean_with_cfg(kind, sampler):
    torch.manual_seed(0)
    net = DiT(DiTConfig(in_channels=3, size="T", num_classes=4, given_tokens=True))
    for p in net.final.parameters():  # a non-zero output, so the sampler really moves the latents
        torch.nn.init.normal_(p, std=0.1)
    seen = []
    forward = net.forward

    def spy(x, t, **kw):
        seen.append((x.clone(), kw.get("given"), kw.get("drop")))
        return forward(x, t, **kw)

    net.forward = spy
    obj = RectifiedFlow() if kind == "rectified_flow" else DDPM(steps=100)
    x_given = torch.randn(2, 3, 4, 8, 8)
    given = tasks.frame_mask("interpolate", 4, 1)[None, :, None, None].expand(2, *GRID)
    z = sample(
        obj,
        net,
        (2, 3, 4, 8, 8),
        {"y": torch.tensor([0, 3])},
        sampler=sampler,
        steps=4,
        cfg_scale=3.0,
        given=given,
        x_given=x_given,
    )
    g = given_latents(given, z).expand_as(z)
    assert torch.equal(z[g], x_given[g])  # given frames come back exactly
    assert not torch.allclose(z[~g], x_given[~g])
    for x, gv, drop in seen:  # at every step, in both CFG branches, the model saw them clean
        assert gv.shape[0] == x.shape[0] == 4 and drop.tolist() == [False, False, True, True]
        gg = given_latents(gv, x).expand_as(x)
        assert torch.equal(x[gg], torch.cat([x_given, x_given])[gg])


# ------------------------------------------------------------------------ scoring and `sample --task`


def test_baselines_copy_blend_and_fill():
    from ditforge.evaluate import task_quality as tq

    T = 5
    px = torch.stack([torch.full((3, 4, 4), float(t)) for t in range(T)], dim=1)[None]  # frame t is all t
    pm = torch.zeros(1, 1, T, 4, 4, dtype=torch.bool)
    pm[:, :, 0] = pm[:, :, 4] = True  # interpolate: first and last given
    assert tq.baseline("interpolate", px, pm)[0, 0, :, 0, 0].tolist() == [0, 1, 2, 3, 4]  # a linear blend
    pm[:, :, 4] = False  # predict from frame 0: copies it
    assert tq.baseline("predict", px, pm)[0, 0, :, 0, 0].tolist() == [0] * 5
    hole = torch.ones(1, 1, T, 4, 4, dtype=torch.bool)
    hole[..., 1:3, 1:3] = False
    img = torch.zeros(1, 3, T, 4, 4)
    img[..., 1:3, 1:3] = 9.0  # the hole holds 9, the rest 0: the fill is the given mean, 0
    assert tq.baseline("complete", img, hole)[..., 1:3, 1:3].abs().max() == 0
    assert tq.psnr(img, img, ~hole).min() > 50  # identical: PSNR capped high
    a = torch.zeros(1, 3, 1, 2, 2)
    assert tq.psnr(a, a + 2 / 255, torch.ones(1, 1, 1, 2, 2, dtype=torch.bool)).item() == pytest.approx(48.13, abs=0.05)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny untrained video-task DiT exported as `ditforge export` writes it (file://)."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("vdt-export")
    torch.manual_seed(0)
    cfg = DiTConfig(
        in_channels=12, size="T", num_classes=8, given_tokens=True, video_attention="factorised", pos_embed="rope"
    )
    save_file(DiT(cfg).state_dict(), str(d / "raw.safetensors"))
    (d / "model.json").write_text(
        json.dumps(
            {
                "dit": dataclasses.asdict(cfg),
                "latent_shape": [12, 4, 8, 8],
                "vae": {"kind": "identity", "downsample": 2},
                "sample": {"steps": 2},
                "objective": {"kind": "rectified_flow"},
                "classes": [],
                "job": "t",
                "video_tasks": {
                    "predict": 1.0,
                    "interpolate": 1.0,
                    "image_to_video": 1.0,
                    "any_frames": 1.0,
                    "complete": 1.0,
                    "k": [1, 2],
                },
            }
        )
    )
    return d


def cli_main(*args):
    from ditforge import cli

    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    return e.value.code


def test_sample_task_writes_npy_gif_mp4_with_given_frames_in_place(export_dir, tmp_path, capsys):
    import json

    import av
    import numpy as np

    from ditforge.data import synthetic

    clip, _, _ = synthetic.moving_shapes_video(3, 16, 4, seed=5)  # (4, 16, 16, 3)
    np.save(tmp_path / "clip.npy", clip)
    code = cli_main(
        "sample",
        "--model",
        f"file://{export_dir}",
        "--task",
        "predict",
        "--k",
        "2",
        "--given",
        str(tmp_path / "clip.npy"),
        "--out",
        str(tmp_path / "o.npy"),
        "--json",
    )
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["out"] == str(tmp_path / "o.npy") and res["frames"] == 4
    o = np.load(tmp_path / "o.npy")
    assert o.shape == (4, 16, 16, 3) and o.dtype == np.uint8
    assert np.array_equal(o[:2], clip[:2]) and not np.array_equal(o[2:], clip[2:])
    # Only the given frames (2 for interpolate with k=1) also work; .gif and .mp4 out.
    np.save(tmp_path / "ends.npy", clip[[0, 3]])
    assert (
        cli_main(
            "sample",
            "--model",
            f"file://{export_dir}",
            "--task",
            "interpolate",
            "--k",
            "1",
            "--given",
            str(tmp_path / "ends.npy"),
            "--out",
            str(tmp_path / "o.mp4"),
        )
        == 0
    )
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert c.streams.video[0].codec_context.name in ("h264", "libx264")
        assert len(list(c.decode(video=0))) == 4
    from PIL import Image

    Image.fromarray(clip[0]).save(tmp_path / "first.png")
    assert (
        cli_main(
            "sample",
            "--model",
            f"file://{export_dir}",
            "--task",
            "image_to_video",
            "--given",
            str(tmp_path / "first.png"),
            "--out",
            str(tmp_path / "o.gif"),
        )
        == 0
    )
    assert Image.open(tmp_path / "o.gif").n_frames == 4


def test_sample_any_frames_and_a_chosen_complete_region(export_dir, tmp_path):
    """`--task any_frames --frames 0,2`: those frames come back as given, the others generated;
    `--task complete --region 0:4,0:8,0:8`: only that box (frames 0-3, the top-left 8x8 pixels) is
    generated, everything outside it comes back exactly as given."""
    import numpy as np

    from ditforge.data import synthetic

    clip, _, _ = synthetic.moving_shapes_video(3, 16, 4, seed=5)  # (4, 16, 16, 3)
    np.save(tmp_path / "two.npy", clip[[0, 2]])  # only the given frames
    m = f"file://{export_dir}"
    out = tmp_path / "any.npy"
    assert (
        cli_main(
            "sample",
            "--model",
            m,
            "--task",
            "any_frames",
            "--frames",
            "0,2",
            "--given",
            str(tmp_path / "two.npy"),
            "--out",
            str(out),
        )
        == 0
    )
    o = np.load(out)
    assert o.shape == (4, 16, 16, 3)
    assert np.array_equal(o[[0, 2]], clip[[0, 2]]) and not np.array_equal(o[[1, 3]], clip[[1, 3]])
    np.save(tmp_path / "clip.npy", clip)
    out = tmp_path / "box.npy"
    assert (
        cli_main(
            "sample",
            "--model",
            m,
            "--task",
            "complete",
            "--region",
            "0:4,0:8,0:8",
            "--given",
            str(tmp_path / "clip.npy"),
            "--out",
            str(out),
        )
        == 0
    )
    o = np.load(out)
    inside = np.zeros(o.shape, dtype=bool)
    inside[:, :8, :8] = True
    assert np.array_equal(o[~inside], clip[~inside]) and not np.array_equal(o[inside], clip[inside])


def test_sample_task_bad_input_is_one_line(export_dir, tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "small.npy", np.zeros((4, 8, 8, 3), np.uint8))
    np.save(tmp_path / "three.npy", np.zeros((3, 16, 16, 3), np.uint8))
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    m = f"file://{export_dir}"
    cases = [
        (["--task", "predict", "--given", str(tmp_path / "small.npy")], "frames are 8x8, the model takes 16x16"),
        (["--task", "predict", "--k", "2", "--given", str(tmp_path / "three.npy")], "3 frames, predict takes 2 given"),
        (["--task", "predict_backward", "--given", str(tmp_path / "three.npy")], "not trained for it"),
        (["--task", "predict", "--k", "3", "--given", str(tmp_path / "three.npy")], "trained with k in [1, 2]"),
        (["--task", "predict", "--given", str(tmp_path / "junk.mp4")], "cannot read"),
        (["--task", "predict", "--given", str(tmp_path / "none.npy")], "no such file"),
        (["--frames", "0"], "--frames: 0: needs --task"),
        (["--task", "predict", "--frames", "0", "--given", str(tmp_path / "three.npy")], "only with --task any_frames"),
        (["--task", "any_frames", "--given", str(tmp_path / "three.npy")], "needs --frames LIST"),
        (["--task", "any_frames", "--frames", "0,9", "--given", str(tmp_path / "three.npy")], "numbered 0 to 3"),
        (["--task", "any_frames", "--frames", "0,x", "--given", str(tmp_path / "three.npy")], "separated by commas"),
        (["--task", "any_frames", "--frames", "0,1,2,3", "--given", str(tmp_path / "three.npy")], "leave at least one"),
        (
            ["--task", "any_frames", "--frames", "0,1", "--given", str(tmp_path / "three.npy")],
            "3 frames, any_frames takes 2 given",
        ),
        (
            ["--task", "interpolate", "--region", "0:4,0:8,0:8", "--given", str(tmp_path / "three.npy")],
            "only with --task complete",
        ),
        (
            ["--task", "complete", "--region", "0:4,0:8", "--given", str(tmp_path / "three.npy")],
            "give T0:T1,Y0:Y1,X0:X1",
        ),
        (
            ["--task", "complete", "--region", "0:4,0:8,4:20", "--given", str(tmp_path / "three.npy")],
            "columns 4:20 must satisfy",
        ),
        (
            ["--task", "complete", "--region", "0:4,0:16,0:16", "--given", str(tmp_path / "three.npy")],
            "covers the whole clip",
        ),
    ]
    for extra, want in cases:
        assert cli_main("sample", "--model", m, *extra, "--out", str(tmp_path / "x.npy")) == 2, extra
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], (extra, lines)
    assert (
        cli_main(
            "sample",
            "--model",
            m,
            "--task",
            "predict",
            "--given",
            str(tmp_path / "three.npy"),
            "--out",
            str(tmp_path / "x.png"),
        )
        == 2
    )
    assert not (tmp_path / "x.npy").exists()


def test_spec_video_tasks_validation():
    from ditforge.spec import SpecError, build, JobSpec

    base = {"name": "v", "data": {"train": "file:///tmp/x", "frames": 8}, "vae": {"kind": "identity"}}
    ok = build(JobSpec, {**base, "train": {"video_tasks": {"predict": 1, "interpolate": 1, "k": [1, 3]}}}, "j.yaml")
    assert ok.train.video_tasks.trained() == ["predict", "interpolate"]
    bad = [
        ({"video_tasks": {}}, "train.video_tasks: give at least one task"),
        ({"video_tasks": {"predict": 1, "k": [2, 1]}}, "train.video_tasks.k: [2, 1] must satisfy"),
        ({"video_tasks": {"interpolate": 1, "k": [1, 4]}}, "interpolate with k up to 4 needs 9 latent frames"),
        ({"video_tasks": {"predcit": 1}}, "did you mean 'predict'"),
    ]
    for train, want in bad:
        with pytest.raises(SpecError, match=want.replace("[", r"\[").replace("]", r"\]")):
            build(JobSpec, {**base, "train": train}, "j.yaml")
    with pytest.raises(SpecError, match="at least 2 latent token frames"):
        build(
            JobSpec,
            {**base, "data": {"train": "file:///tmp/x", "frames": 1}, "train": {"video_tasks": {"predict": 1}}},
            "j.yaml",
        )


def test_score_tasks_reports_each_task_and_its_baseline(tmp_path):
    """An untrained model, 4 held-out clips: every metric present and finite, a GIF per task, and
    noise from an untrained model loses to the copy-last-frame baseline (the metric can fail)."""
    from PIL import Image

    from ditforge.models.vae import IdentityVAE
    from ditforge.spec import SampleSpec
    from ditforge.evaluate import task_quality as tq

    torch.manual_seed(0)
    net = DiT(DiTConfig(in_channels=12, size="T", num_classes=8, given_tokens=True))
    metrics, examples = tq.score_tasks(
        net,
        RectifiedFlow(),
        IdentityVAE(2),
        list(tasks.TASKS),
        (12, 4, 8, 8),
        16,
        4,
        SampleSpec(steps=1),
        1,
        4,
        torch.device("cpu"),
    )
    assert set(examples) == set(tq.EVAL_TASKS)
    for task in tq.EVAL_TASKS:
        assert all(
            torch.isfinite(torch.tensor(metrics[f"validation/tasks/{task}/{m}"])) for m in ("psnr", "baseline_psnr")
        )
    gif = tq.task_gif(*examples["complete"], str(tmp_path / "c.gif"))
    assert Image.open(gif).n_frames == 4
    # small clips are enlarged to about 96 px, large ones written at their own size
    for size, scale in ((16, 6), (128, 1)):
        clip = torch.zeros(1, 3, 2, size, size)
        big = tq.task_gif(clip, clip, torch.zeros(1, 1, 2, size, size, dtype=torch.bool), str(tmp_path / f"{size}.gif"))
        assert Image.open(big).size == (2 * (size * scale + 2) + 2, size * scale + 4)
    assert (
        metrics["validation/tasks/predict/psnr"] < metrics["validation/tasks/predict/baseline_psnr"]
    )  # noise loses to copying
