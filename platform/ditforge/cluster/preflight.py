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


def data_commands(spec: JobSpec, job_file: str) -> list[str]:
    """The commands that make `data.train` for this job (the generated sets: shapes / moving-shapes)."""
    train = spec.data.train.rstrip("/")
    parent, name = train.rsplit("/", 1)
    video = spec.data.frames > 1
    pixels = train if spec.task == "vae" else f"{parent}/{name.removesuffix('-latents')}-pixels"
    if "shapes" in name:  # a generated set: ditforge makes it itself
        source = "moving-shapes" if video else "shapes"
        ingest = (
            f"ditforge data ingest {source} --out {pixels} --limit {1024 if video else 2048} "
            f"--resolution {spec.data.resolution}" + (f" --frames {spec.data.frames}" if video else "")
        )
    else:
        ingest = f"ditforge data ingest SOURCE --out {pixels} --resolution {spec.data.resolution}" + (
            f" --frames {spec.data.frames}" if video else ""
        )
    if spec.task == "vae":
        return [ingest]
    return [ingest, f"ditforge data encode {pixels} --vae {job_file} --out {train}"]


def _make_it(spec: JobSpec, job_file: str) -> str:
    return "make it with: " + " && ".join(data_commands(spec, job_file))


def check_data(spec: JobSpec, job_file: str) -> None:
    from ..models.info import latent_shape

    where = f"{job_file}: data.train"
    try:
        m = shards.read_manifest(spec.data.train)
    except shards.DataError as e:
        raise PreflightError(f"{where}: {e}; {_make_it(spec, job_file)}") from None
    want = "pixels" if spec.task == "vae" else "latents"
    kind = m.get("kind", "latents" if "latent_shape" in m else "pixels")
    if kind != want:
        fix = (
            ("encode it first: " + data_commands(spec, job_file)[-1])
            if want == "latents"
            else "a VAE job trains on pixels: point data.train at the output of `ditforge data ingest`"
        )
        raise PreflightError(f"{where}: {spec.data.train} holds {kind}, but a {spec.task} job needs {want}; {fix}")
    if not m.get("shards") or not m.get("total_samples"):
        raise PreflightError(f"{where}: {spec.data.train} has no samples; {_make_it(spec, job_file)}")
    if spec.task == "vae":
        return
    got, expect = tuple(m.get("latent_shape") or ()), tuple(latent_shape(spec))
    if got and got != expect:
        hint = (
            "data.frames"
            if len(got) == len(expect) == 4 and got[1] != expect[1]
            else "vae (kind, downsample, latent_channels)"
            if got[0] != expect[0]
            else "data.resolution / data.frames"
        )
        raise PreflightError(
            f"{where}: its latents are {list(got)}, but this spec (vae.kind {spec.vae.kind}, "
            f"data.resolution {spec.data.resolution}, data.frames {spec.data.frames}) expects "
            f"{list(expect)}: set {hint} to match the data, or encode the data for this spec"
        )
    classes = m.get("classes") or []
    if spec.model.num_classes and len(classes) > spec.model.num_classes:
        raise PreflightError(
            f"{job_file}: model.num_classes: {spec.model.num_classes}, but {spec.data.train} has "
            f"{len(classes)} classes: set model.num_classes: {len(classes)}"
        )


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
