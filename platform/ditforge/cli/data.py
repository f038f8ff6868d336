"""data: ingest sources into shards, encode latents, verify data sets."""

from __future__ import annotations

from typing import Optional

import typer

from .common import err, out, user_errors

app = typer.Typer(no_args_is_help=True, help="Ingest sources into shards, encode latents, verify data sets.")


def _uri_option(name: str, value: str) -> None:
    """A URI option with an unknown scheme fails here, before Ray or a store is touched."""
    from ..spec import URI_SCHEMES, SpecError

    if "://" in value and value.split("://", 1)[0] not in URI_SCHEMES:
        raise SpecError(
            name,
            "",
            f"unknown URI scheme '{value.split('://', 1)[0]}://' in {value} "
            f"(known: {', '.join(s + '://' for s in URI_SCHEMES)})",
        )


@app.command("ingest")
@user_errors
def data_ingest(
    source: str = typer.Argument(
        ...,
        help="folder / URI of images or videos, a webdataset (.tar, folder of .tar, "
        "brace pattern), or a generated set: shapes | moving-shapes",
    ),
    out_uri: str = typer.Option(..., "--out", help="where the shards and manifest.json go (file://, s3://, gs://)"),
    shard_size: int = typer.Option(256, help="inputs per unit of work (one shard per bucket per unit)"),
    resolution: int = typer.Option(32, help="side of the square (crop) or pixel budget side (bucket)"),
    fit: str = typer.Option("crop", help="crop: resize + centre-crop to a square; bucket: keep aspect ratio"),
    frames: int = typer.Option(8, help="videos: frames per clip (shorter clips go to F/2, F/4 buckets)"),
    stride: int = typer.Option(2, help="videos: take every STRIDE-th source frame"),
    limit: Optional[int] = typer.Option(
        None, help="generated sets: how many; folders and webdatasets: the first N inputs"
    ),
    seed: int = typer.Option(0, help="generated sets: the seed"),
) -> None:
    """Turn a source into webdataset shards + manifest.json (re-running resumes)."""
    from .. import services
    from ..data.ingest import ingest

    _uri_option("--out", out_uri)
    m = ingest(
        source,
        out_uri,
        resolution=resolution,
        fit=fit,
        frames=frames,
        stride=stride,
        shard_size=shard_size,
        limit=limit,
        seed=seed,
        ray_fallback=services.running_ray,
    )
    buckets = ", ".join(f"{b}: {v['samples']}" for b, v in m["buckets"].items())
    out.print(
        f"{m['total_samples']} samples in {len(m['shards'])} shards ({buckets}); "
        f"{m['skipped_count']} skipped → {out_uri}",
        highlight=False,
    )
    for s in m["skipped"][:10]:
        err.print(f"skipped: {s['item']}: {s['reason']}", markup=False, highlight=False)
    if m["skipped_count"] > 10:
        err.print(f"... and {m['skipped_count'] - 10} more (manifest.json `skipped`)", highlight=False)


@app.command("encode")
@user_errors
def data_encode(
    in_uri: str = typer.Argument(..., help="pixel data set (the output of `data ingest`)"),
    vae: str = typer.Option("identity", help="VAE: a YAML file (job spec or its vae: section) or KIND[,key=value...]"),
    out_uri: str = typer.Option(..., "--out", help="where the latent shards and manifest.json go"),
) -> None:
    """Encode pixel shards to latent shards with Ray Data (re-running resumes)."""
    from .. import services
    from ..data.encode import encode_dataset, parse_vae

    _uri_option("--out", out_uri)
    m = encode_dataset(in_uri, out_uri, parse_vae(vae), ray_fallback=services.running_ray)
    out.print(
        f"{m['total_samples']} latents {tuple(m['latent_shape'])} ({m['vae']}), mean {m['latent_mean']:.4f} "
        f"std {m['latent_std']:.4f} → {out_uri}",
        highlight=False,
    )


@app.command("verify")
@user_errors
def data_verify(uri: str = typer.Argument(..., help="a data set (folder holding manifest.json)")) -> None:
    """Check every shard against the manifest's checksums; exit 2 naming the bad ones."""
    from ..data import shards

    bad = shards.verify(uri)
    if bad:
        for name in bad:
            err.print(
                f"error: {uri}/{name}: checksum does not match the manifest",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(2)
    out.print(f"ok: {uri} ({len(shards.read_manifest(uri)['shards'])} shards)", highlight=False)
