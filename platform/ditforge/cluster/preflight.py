"""What `submit` checks before any Ray job exists: the data set is complete and of the kind the
job needs, and the VAE / text encoder the spec names is there. Each problem is one line naming
the field (and, for a data set not made yet, the commands that make it), so a new user's first
`submit` does not place workers only to fail in every one of them."""

from __future__ import annotations

from pathlib import Path

from .. import storage
from ..data import shards
from ..spec import JobSpec


class PreflightError(Exception):
    """One line: `<job file>: <field>: <reason>`."""


def data_commands(spec: JobSpec, job_file: str, mix: int | None = None) -> list[str]:
    """The commands that make `data.train` for this job (or its `data.mix` entry `mix`), for the
    generated sets (shapes / moving-shapes) with the generator's name."""
    src = spec.data.sources()[0 if mix is None else mix + 1]
    train = src.train.rstrip("/")
    parent, name = train.rsplit("/", 1)
    video = src.frames > 1
    pixels = train if spec.task == "vae" else f"{parent}/{name.removesuffix('-latents')}-pixels"
    size = f"--resolution {src.resolution}" + (f" --frames {src.frames}" if video else "")
    if "shapes" in name:  # a generated set: ditforge makes it itself
        source = "moving-shapes" if video else "shapes"
        ingest = f"ditforge data ingest {source} --out {pixels} --limit {1024 if video else 2048} {size}"
    else:
        ingest = f"ditforge data ingest SOURCE --out {pixels} {size}"
    if spec.task == "vae":
        return [ingest]
    return [ingest, f"ditforge data encode {pixels} --vae {job_file} --out {train}"]


def _make_it(spec: JobSpec, job_file: str, mix: int | None = None) -> str:
    return "make it with: " + " && ".join(data_commands(spec, job_file, mix))


def check_data(spec: JobSpec, job_file: str) -> None:
    """`data.train`, then each `data.mix` set: there, complete, latents of the shape the spec gives."""
    m = _check_set(spec, job_file, None)
    if spec.task == "vae":
        return
    classes = m.get("classes") or []
    if spec.model.num_classes and len(classes) > spec.model.num_classes:
        raise PreflightError(
            f"{job_file}: model.num_classes: {spec.model.num_classes}, but {spec.data.train} has "
            f"{len(classes)} classes: set model.num_classes: {len(classes)}"
        )
    for i, src in enumerate(spec.data.mix):
        other = _check_set(spec, job_file, i).get("classes") or []
        if src.labels == "keep" and spec.model.num_classes and other != classes:
            raise PreflightError(
                f"{job_file}: data.mix.{i}.labels: {src.train} has the classes {other[:4]}{'...' if len(other) > 4 else ''}, "
                f"data.train {classes[:4]}{'...' if len(classes) > 4 else ''}: their ids mean different things; "
                "set labels: drop to train this set with the null class"
            )


def _check_set(spec: JobSpec, job_file: str, mix: int | None) -> dict:
    """One data set of the job (`data.train`, or `data.mix` entry `mix`) → its manifest."""
    from ..models.info import latent_shape

    src = spec.data.sources()[0 if mix is None else mix + 1]
    field = "data.train" if mix is None else f"data.mix.{mix}.train"
    where = f"{job_file}: {field}"
    try:
        m = shards.read_manifest(src.train)
    except shards.DataError as e:
        raise PreflightError(f"{where}: {e}; {_make_it(spec, job_file, mix)}") from None
    want = "pixels" if spec.task == "vae" else "latents"
    kind = m.get("kind", "latents" if "latent_shape" in m else "pixels")
    if kind != want:
        fix = (
            ("encode it first: " + data_commands(spec, job_file, mix)[-1])
            if want == "latents"
            else "a VAE job trains on pixels: point data.train at the output of `ditforge data ingest`"
        )
        raise PreflightError(f"{where}: {src.train} holds {kind}, but a {spec.task} job needs {want}; {fix}")
    if not m.get("shards") or not m.get("total_samples"):
        raise PreflightError(f"{where}: {src.train} has no samples; {_make_it(spec, job_file, mix)}")
    if spec.task == "vae":
        return m
    got, expect = tuple(m.get("latent_shape") or ()), tuple(latent_shape(spec, src.resolution, src.frames))
    if got and got != expect:
        at = "data" if mix is None else f"data.mix.{mix}"
        hint = (
            f"{at}.frames"
            if len(got) == len(expect) == 4 and got[1] != expect[1]
            else "vae (kind, downsample, latent_channels)"
            if got[0] != expect[0]
            else f"{at}.resolution / {at}.frames"
        )
        raise PreflightError(
            f"{where}: its latents are {list(got)}, but this spec (vae.kind {spec.vae.kind}, "
            f"{at}.resolution {src.resolution}, {at}.frames {src.frames}) expects "
            f"{list(expect)}: set {hint} to match the data, or encode the data for this spec"
        )
    return m


def _local_folder(path: str) -> Path:
    return Path(path.removeprefix("file://")).expanduser()


def check_models(spec: JobSpec, job_file: str) -> None:
    v = spec.vae
    if v.kind == "own" and spec.task == "dit":
        assert v.path is not None  # VAESpec requires it for kind own
        if not storage.exists(storage.join(v.path, "config.json")):
            raise PreflightError(
                f"{job_file}: vae.path: no trained autoencoder at {v.path} (no config.json): train it "
                f"first with a `task: vae` job writing there (e.g. `ditforge submit jobs/vae-shapes.yaml`)"
            )
    if v.kind == "diffusers":
        assert v.path is not None  # VAESpec requires it for kind diffusers
        if not (_local_folder(v.path) / "config.json").is_file():
            raise PreflightError(
                f"{job_file}: vae.path: {v.path} is not a diffusers AutoencoderKL folder (no config.json): "
                "save one there with save_pretrained"
            )
    if spec.model.text == "transformers":
        assert spec.model.text_encoder is not None  # ModelSpec requires it for text: transformers
        if not (_local_folder(spec.model.text_encoder) / "config.json").is_file():
            raise PreflightError(
                f"{job_file}: model.text_encoder: {spec.model.text_encoder} is not a transformers model "
                "folder (no config.json): save the encoder there with save_pretrained"
            )


def check(spec: JobSpec, job_file: str) -> None:
    """Every check that needs no Ray: the models first (cheap), then the data set."""
    check_models(spec, job_file)
    check_data(spec, job_file)
