"""Ingest (every source kind, bad inputs, resume) and encode (round trip, resume), on local files
and on the embedded S3 server. One private Ray serves the whole module."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ditforge import storage
from ditforge.data import encode, ingest, shards
from ditforge.data.encode import encode_dataset, parse_vae
from ditforge.data.loader import LatentLoader
from ditforge.models.vae import build_vae


pytestmark = pytest.mark.usefixtures("data_ray")


def img_bytes(w: int, h: int, fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def video_bytes(n: int, fmt: str, codec: str, size: int = 48) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=8)
        s.width = s.height = size
        s.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), i * 10 % 255, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def samples_of(uri: str) -> list[dict]:
    m = shards.read_manifest(uri)
    return [s for e in m["shards"] for s in shards.read_shard(uri, e)]


def test_image_folder_with_planted_bad_files_and_resume(tmp_path):
    src = tmp_path / "photos"
    (src / "cat").mkdir(parents=True)
    (src / "dog").mkdir()
    good = {
        "cat/a.jpg": img_bytes(64, 48, "JPEG"),
        "cat/b.png": img_bytes(40, 40, "PNG", 1),
        "cat/c.webp": img_bytes(30, 60, "WEBP", 2),
        "dog/d.jpg": img_bytes(80, 40, "JPEG", 3),
        "dog/e.png": img_bytes(33, 47, "PNG", 4),
        "dog/f.jpg": img_bytes(100, 100, "JPEG", 5),
    }
    for rel, data in good.items():
        (src / rel).write_bytes(data)
    (src / "cat/a.txt").write_text("a tabby cat")
    bad = {
        "cat/empty.jpg": b"",
        "cat/noise.png": b"\x89PNG\r\n\x1a\n" + bytes(range(200)),
        "dog/trunc.jpg": img_bytes(64, 64, "JPEG", 6)[:300],
        "dog/notes.bmp": img_bytes(8, 8, "BMP"),
        "dog/fake.jpg": b"this is not a jpeg",
        "cat/badcap.jpg": img_bytes(32, 32, "JPEG", 7),
    }
    for rel, data in bad.items():
        (src / rel).write_bytes(data)
    (src / "cat/badcap.txt").write_bytes(b"caf\xe9 \xff")  # Latin-1, not UTF-8

    out = f"file://{tmp_path}/shards"
    m = ingest.ingest(str(src), out, resolution=32, fit="bucket", shard_size=4, progress=False)
    assert m["total_samples"] == len(good)
    reasons = {s["item"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(bad) and m["skipped_count"] == len(bad)
    assert reasons["cat/empty.jpg"] == "zero-byte file"
    assert reasons["dog/notes.bmp"] == "unsupported extension '.bmp'"
    assert "caption is not UTF-8" in reasons["cat/badcap.jpg"]
    assert all(
        reasons[k].startswith("not a decodable image") for k in ("cat/noise.png", "dog/trunc.jpg", "dog/fake.jpg")
    )
    assert m["classes"] == ["cat", "dog"] and m["ingest_version"] == ingest.INGEST_VERSION
    # Aspect-ratio buckets: 64x48 is 4:3, 30x60 is 1:2, 80x40 is 2:1; each shard holds one shape.
    assert {"img-32x32", "img-24x40", "img-48x24", "img-24x48"} <= set(m["buckets"])
    by_src = {}
    for e in m["shards"]:
        for s in shards.read_shard(out, e):
            h, w = e["shape"]
            assert Image.open(io.BytesIO(s["png"])).size == (w, h)
            by_src[json.loads(s["json"])["src"]] = s
    assert by_src["cat/a.jpg"]["txt"] == b"a tabby cat" and by_src["cat/a.jpg"]["cls"] == b"0"
    assert by_src["dog/d.jpg"]["cls"] == b"1" and by_src["dog/d.jpg"]["txt"] == b""

    # Resume after an interrupted write: unit 1's shard is half-written and its record missing.
    base = tmp_path / "shards"
    victim = next(e for e in m["shards"] if e["name"].startswith("shard-000001"))
    (base / victim["name"]).write_bytes((base / victim["name"]).read_bytes()[:1000])
    (base / shards.PARTS / "unit-000001.json").unlink()
    (base / shards.MANIFEST).unlink()
    untouched = {p.name: p.stat().st_mtime_ns for p in base.glob("shard-000000-*.tar")}
    m2 = ingest.ingest(str(src), out, resolution=32, fit="bucket", shard_size=4, progress=False)
    assert m2["shards"] == m["shards"] and shards.verify(out) == []
    assert {p.name: p.stat().st_mtime_ns for p in base.glob("shard-000000-*.tar")} == untouched  # not redone


def test_video_folder_duration_buckets_and_bad_videos(tmp_path):
    src = tmp_path / "clips"
    src.mkdir()
    (src / "long.mp4").write_bytes(video_bytes(20, "mp4", "mpeg4"))  # ≥ 15 frames: 8 at stride 2
    (src / "mid.webm").write_bytes(video_bytes(9, "webm", "libvpx"))  # 9 frames → 5 picked → bucket 4
    (src / "anim.gif").write_bytes(video_bytes(16, "gif", "gif"))
    (src / "anim.txt").write_text("a flickering square")
    (src / "blip.gif").write_bytes(video_bytes(1, "gif", "gif"))  # 1 frame: shorter than any bucket
    (src / "broken.mp4").write_bytes(video_bytes(20, "mp4", "mpeg4")[:200])
    out = f"file://{tmp_path}/vid"
    m = ingest.ingest(str(src), out, resolution=32, frames=8, stride=2, shard_size=8, progress=False)
    assert m["total_samples"] == 3
    assert {b: v["samples"] for b, v in m["buckets"].items()} == {"vid-8x32x32": 2, "vid-4x32x32": 1}
    reasons = {s["item"]: s["reason"] for s in m["skipped"]}
    assert reasons["blip.gif"].startswith("too short") and reasons["broken.mp4"].startswith("not a decodable video")
    got = {json.loads(s["json"])["src"]: s for s in samples_of(out)}
    assert shards.npy_load(got["mid.webm"]["frames.npy"]).shape == (4, 32, 32, 3)
    assert got["anim.gif"]["txt"] == b"a flickering square"


def test_generated_sets_and_webdataset_source(tmp_path):
    mv = f"file://{tmp_path}/moving"
    m = ingest.ingest("moving-shapes", mv, limit=10, frames=4, shard_size=6, progress=False)
    assert m["total_samples"] == 10 and m["classes"][0] == "right" and list(m["buckets"]) == ["vid-4x32x32"]
    s0 = samples_of(mv)[0]
    assert shards.npy_load(s0["frames.npy"]).shape == (4, 32, 32, 3) and b"moving" in s0["txt"]

    # An existing webdataset (jpg + cls + txt), one sample without an image, read by brace pattern.
    wd = tmp_path / "wd"
    wd.mkdir()
    for t in range(2):
        with wds.TarWriter(str(wd / f"part-{t:04d}.tar")) as sink:
            for i in range(5):
                sink.write(
                    {"__key__": f"img{t}_{i}", "jpg": img_bytes(48, 48, "JPEG", i), "cls": str(i), "txt": f"pic {i}"}
                )
            sink.write({"__key__": f"meta{t}", "json": b"{}"})
    out = f"file://{tmp_path}/from-wd"
    m = ingest.ingest(f"{wd}/part-{{0000..0001}}.tar", out, shard_size=4, progress=False)
    assert m["source_kind"] == "webdataset" and m["total_samples"] == 10 and m["skipped_count"] == 2
    assert m["skipped"][0]["reason"].startswith("no image or video member")
    keys = {s["__key__"]: s for s in samples_of(out)}
    assert keys["img1_3"]["cls"] == b"3" and keys["img1_3"]["txt"] == b"pic 3"


def test_limit_takes_the_first_inputs_of_a_webdataset_and_a_folder(tmp_path, s3_prefix):
    # Two tars on S3, each: 4 images then one sample without an image (an input that is skipped).
    for t in range(2):
        local = tmp_path / f"part-{t}.tar"
        with wds.TarWriter(str(local)) as sink:
            for i in range(4):
                sink.write({"__key__": f"img{t}_{i}", "png": img_bytes(32, 32, "PNG", i), "cls": str(i)})
            sink.write({"__key__": f"meta{t}", "json": b"{}"})
        storage.put_file(local, f"{s3_prefix}/wd/part-{t}.tar")
    got = {}
    for limit in (3, 7, 100):
        m = ingest.ingest(f"{s3_prefix}/wd", f"{s3_prefix}/out{limit}", limit=limit, shard_size=4, progress=False)
        got[limit] = (sorted(s["__key__"] for s in samples_of(f"{s3_prefix}/out{limit}")), m["skipped_count"])
    assert got[3] == (["img0_0", "img0_1", "img0_2"], 0)  # cut inside the first tar
    assert got[7] == (["img0_0", "img0_1", "img0_2", "img0_3", "img1_0", "img1_1"], 1)  # 5 inputs + 2 of the 2nd
    assert got[100] == ([f"img{t}_{i}" for t in range(2) for i in range(4)], 2)  # fewer inputs than the limit
    # A folder: its first N files, in name order.
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(5):
        (folder / f"p{i}.png").write_bytes(img_bytes(32, 32, "PNG", i))
    m = ingest.ingest(str(folder), f"file://{tmp_path}/pics-out", limit=2, progress=False)
    assert m["total_samples"] == 2 and sorted(s["json"] for s in samples_of(f"file://{tmp_path}/pics-out")) == [
        b'{"src": "p0.png"}',
        b'{"src": "p1.png"}',
    ]


def test_encode_round_trip_and_resume_on_s3(s3_prefix):
    pixels, latents = f"{s3_prefix}/pixels", f"{s3_prefix}/latents"
    ingest.ingest_shapes(pixels, limit=40, shard_size=16, progress=False)
    spec = parse_vae("identity,downsample=2")
    m = encode_dataset(pixels, latents, spec, progress=False)
    assert m["kind"] == "latents" and m["vae"] == "identity(downsample=2)" and m["latent_shape"] == [12, 16, 16]
    assert [e["name"] for e in m["shards"]] == [e["name"] for e in shards.read_manifest(pixels)["shards"]]
    assert m["total_samples"] == 40 and 0 < m["latent_std"] and len(m["channel_std"]) == 12
    vae = build_vae(spec)
    pix = {s["__key__"]: s for s in samples_of(pixels)}
    for s in samples_of(latents):
        p = pix[s["__key__"]]
        assert (s["cls"], s["txt"]) == (p["cls"], p["txt"])
        back = vae.decode(torch.from_numpy(shards.npy_load(s["latent.npy"]))[None])[0]
        assert torch.allclose(back, torch.from_numpy(encode._pixels(p)), atol=1e-6)

    # Interrupted encode: one latent shard and its record gone, manifest not yet written.
    name = m["shards"][1]["name"]
    storage.remove(storage.join(latents, name))
    storage.remove(storage.join(latents, shards.PARTS, f"{name}.json"))
    storage.remove(storage.join(latents, shards.MANIFEST))
    before = shards.read_part(latents, m["shards"][0]["name"])
    m2 = encode_dataset(pixels, latents, spec, progress=False)
    assert m2["shards"] == m["shards"] and shards.read_part(latents, m["shards"][0]["name"]) == before

    # The stream reads the S3 set like a local one.
    x, y, keys, captions = next(iter(LatentLoader(latents, 8, 0, 2, seed=0)))
    assert x.shape == (8, 12, 16, 16) and len(set(keys)) == 8
    # captions travel with their samples (the shapes set captions every image)
    assert len(captions) == 8 and all(c.startswith("a ") for c in captions)


def test_encode_videos_gives_channel_time_latents(tmp_path):
    mv, lat = f"file://{tmp_path}/mv", f"file://{tmp_path}/mvlat"
    ingest.ingest("moving-shapes", mv, limit=6, frames=4, progress=False)
    m = encode_dataset(mv, lat, parse_vae("identity"), progress=False)
    assert m["latent_shape"] == [12, 4, 16, 16]
    x, y, _, _ = next(iter(LatentLoader(lat, 3, 0, 1, seed=0)))
    assert x.shape == (3, 12, 4, 16, 16) and set(y.tolist()) <= set(range(8))


def test_bad_arguments_are_one_line_errors(cli, tmp_path):
    r = cli("data", "ingest", str(tmp_path / "nowhere"), "--out", f"file://{tmp_path}/o")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(shards.DataError, match="--vae: downsample"):
        parse_vae("identity,downsample=3x")
    with pytest.raises(shards.DataError, match="--fit"):
        ingest.ingest("shapes", f"file://{tmp_path}/o", limit=4, fit="stretch")
