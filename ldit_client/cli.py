"""`ldit`: the service from a shell, over its HTTP API only.

    ldit generate 7 --seed 42 -o seven.png          # one image (also --format webp|jpeg, -n 4)
    ldit sample --classes all --per-class 50 -o samples.npz   # a sample set for FID, with progress bars
    ldit sample --resume b0123... -o samples.npz    # pick a set up again (after Ctrl-C, a lost shell)
    ldit status                                     # model, workers, queue
    ldit watch JOB                                  # a job's live progress (its Server-Sent Events)

`--url` / `LDIT_URL` (default http://127.0.0.1:8000) and `--api-key` / `LDIT_API_KEY`. Errors are
one line on stderr and exit status 1; Ctrl-C exits with 130. Progress bars are drawn on a terminal
only (stderr); piped or redirected, the command prints its result lines alone.
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from ldit_client.api import ApiError, Client, sse_events

FORMATS = ("png", "webp", "jpeg")
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = 1):
    click.echo(f"ldit: error: {message}", err=True)
    sys.exit(code)


def bar(**kw) -> tqdm:
    """A progress bar on stderr, drawn only when stderr is a terminal."""
    return tqdm(file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kw)


def sampler_options(f):
    for opt in reversed([
        click.option("--preset", help="Sampler preset of the model (ldit status lists them)."),
        click.option("--steps", type=int, help="Time-grid points."),
        click.option("--cfg-scale", type=float, help="Classifier-free guidance scale."),
    ]):
        f = opt(f)
    return f


def sampler_body(preset, steps, cfg_scale) -> dict:
    return {k: v for k, v in (("preset", preset), ("steps", steps), ("cfg_scale", cfg_scale)) if v is not None}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="LDIT_URL", default="http://127.0.0.1:8000", show_default=True,
              help="The service's address (env LDIT_URL).")
@click.option("--api-key", envvar="LDIT_API_KEY", default=None, help="API key, sent as a Bearer token (env LDIT_API_KEY).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for one HTTP answer.")
@click.pass_context
def cli(ctx: click.Context, url: str, api_key: str | None, timeout: float) -> None:
    """The LightningDiT service from a shell (HTTP API only)."""
    ctx.obj = Client(url, api_key or "", timeout)
    ctx.call_on_close(ctx.obj.close)


# -- generate -------------------------------------------------------------------------------------
@cli.command()
@click.argument("class_label")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first image (image i: seed + i).")
@click.option("-n", "count", type=click.IntRange(1, 10), default=1, show_default=True, help="Images (seeds seed..seed+n-1).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Image format (default: from -o's suffix, else png).")
@click.option("--quality", type=click.IntRange(0, 100), default=None,
              help="JPEG quality, or lossy WebP below 100 (default: JPEG 90, WebP lossless).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (with -n, the seed is added to its name). Default: CLASS_SEED.FORMAT.")
@sampler_options
@click.pass_obj
def generate(client: Client, class_label: str, seed: int, count: int, fmt: str | None, quality: int | None,
             out: Path | None, preset, steps, cfg_scale) -> None:
    """Generate images of CLASS_LABEL (a class id, name or synonym) and write them to files."""
    if fmt is None:
        suffix = out.suffix.lower().lstrip(".") if out else ""
        fmt = {"jpg": "jpeg"}.get(suffix, suffix) if suffix in (*FORMATS, "jpg") else "png"
    sampler = sampler_body(preset, steps, cfg_scale)
    try:
        if count == 1:
            body = {"class_label": class_label, "seed": seed, "output_format": fmt, **sampler}
            if quality is not None:
                body["output_compression"] = quality
            r = client.request("POST", "/generate", json=body)
            results = [(seed, r.content, r.headers)]
        else:
            body = {"prompt": class_label, "n": count, "seed": seed, "output_format": fmt,
                    "response_format": "b64_json", **sampler}
            if quality is not None:
                body["output_compression"] = quality
            answer = client.json("POST", "/v1/images/generations", json=body)
            results = [(int(d.get("seed", seed + i)), base64.b64decode(d["b64_json"]), None)
                       for i, d in enumerate(answer["data"])]
    except ApiError as err:
        fail(str(err))
    for s, blob, headers in results:
        path = out_path(out, class_label, s, fmt, count > 1)
        path.write_bytes(blob)
        extra = f", {headers.get('x-compute-ms')} ms compute, cache {headers.get('x-cache')}" if headers else ""
        click.echo(f"wrote {path} (class {class_label}, seed {s}, {fmt}, {len(blob):,} bytes{extra})")


def out_path(out: Path | None, label: str, seed: int, fmt: str, many: bool) -> Path:
    ext = "jpg" if fmt == "jpeg" else fmt
    if out is None:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:40] or "image"
        return Path(f"{safe}_{seed}.{ext}")
    return out.with_name(f"{out.stem}_{seed}{out.suffix or '.' + ext}") if many else out


# -- sample ---------------------------------------------------------------------------------------
@cli.command()
@click.option("--classes", default="all", show_default=True,
              help='"all", or class ids / names separated by commas.')
@click.option("--per-class", type=click.IntRange(1), default=None, help="Images of each class (required for a new set).")
@click.option("--seed-start", type=int, default=0, show_default=True, help="Seed of each class's first image.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .npz to write (arr_0 uint8 [N, H, W, 3], arr_1 labels).")
@click.option("--resume", "resume_id", default=None, metavar="ID", help="Pick up an existing set instead of making one.")
@click.option("--on-interrupt", type=click.Choice(["ask", "cancel", "leave"]), default="ask", show_default=True,
              help="On Ctrl-C: ask (on a terminal; else leave), cancel the set, or leave it running.")
@click.option("--poll", type=float, default=1.0, show_default=True, help="Seconds between progress reads.")
@click.option("--volume", default=None, help="The service's volume for the set's file (LDIT_BATCH_VOLUMES).")
@sampler_options
@click.pass_obj
def sample(client: Client, classes: str, per_class: int | None, seed_start: int, out: Path, resume_id: str | None,
           on_interrupt: str, poll: float, volume: str | None, preset, steps, cfg_scale) -> None:
    """Make a sample set on the service (POST /batches), follow it, and download its .npz."""
    batch_id = resume_id
    try:
        try:
            if resume_id:
                status = client.json("GET", f"/batches/{resume_id}")
                click.echo(f"resuming set {batch_id}: {status['done']} of {status['total']} images done", err=True)
            else:
                if per_class is None:
                    fail("--per-class is required for a new set (or give --resume ID)", 2)
                body = {"classes": parse_classes(classes), "per_class": per_class, "seed_start": seed_start,
                        **sampler_body(preset, steps, cfg_scale)}
                if volume:
                    body["volume"] = volume
                accepted = client.json("POST", "/batches", json=body)
                batch_id = accepted["id"]
                click.echo(f"set {batch_id}: {accepted['total']} images; resume with: "
                           f"ldit sample --resume {batch_id} -o {out}", err=True)
                status = None
        except ApiError as err:
            fail(str(err))
        status = follow(client, batch_id, status, poll)
    except KeyboardInterrupt:
        if batch_id is None:  # stopped before the service answered POST /batches
            click.echo("\ninterrupted before the set was made", err=True)
            sys.exit(EXIT_INTERRUPTED)
        interrupted(client, batch_id, out, on_interrupt)
    except ApiError as err:
        fail(f"{err} (set {batch_id}; resume with: ldit sample --resume {batch_id} -o {out})")
    if status["status"] == "failed":
        fail(f"set {batch_id} failed: {status.get('error') or ''} {status.get('message') or ''}".strip())
    try:
        size = download(client, batch_id, status, out)
    except KeyboardInterrupt:
        click.echo(f"\ndownload stopped; the set stays on the service: ldit sample --resume {batch_id} -o {out}",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)
    except ApiError as err:
        fail(f"{err} (set {batch_id}; resume with: ldit sample --resume {batch_id} -o {out})")
    click.echo(f"wrote {out} ({status['total']} images, {size:,} bytes, set {batch_id})")


def parse_classes(text: str):
    if text.strip().lower() == "all":
        return "all"
    out = []
    for part in text.split(","):
        part = part.strip()
        if part:
            out.append(int(part) if part.isdigit() else part)
    return out


def follow(client: Client, batch_id: str, status: dict | None, poll: float) -> dict:
    """Poll the set's progress into a bar until it stops running; its last status."""
    if status is None:
        status = client.json("GET", f"/batches/{batch_id}")
    with bar(total=status["total"], initial=status["done"], unit="img", desc=f"set {batch_id[:12]}",
             smoothing=0.3) as pbar:
        while True:
            pbar.update(status["done"] - pbar.n)
            if status.get("eta_s") is not None and status.get("images_per_s"):
                pbar.set_postfix_str(f"service: {status['images_per_s']:.2f} img/s, eta {status['eta_s']:.0f} s",
                                     refresh=False)
            if status["status"] != "running":
                pbar.refresh()
                return status
            time.sleep(poll)
            status = client.json("GET", f"/batches/{batch_id}")


def interrupted(client: Client, batch_id: str, out: Path, on_interrupt: str):
    click.echo("", err=True)
    choice = on_interrupt
    if choice == "ask":
        if sys.stdin.isatty():
            try:
                answer = click.prompt(f"Interrupted. Cancel set {batch_id} (delete it on the service) or leave it "
                                      "running?", type=click.Choice(["cancel", "leave"]), default="leave", err=True)
            except (KeyboardInterrupt, click.Abort, EOFError):
                answer = "leave"
            choice = answer
        else:
            choice = "leave"
    if choice == "cancel":
        try:
            gone = client.json("DELETE", f"/batches/{batch_id}")
        except ApiError as err:
            fail(f"could not cancel set {batch_id}: {err}")
        click.echo(f"cancelled set {batch_id} ({gone.get('dropped_jobs', 0)} queued images dropped)", err=True)
    else:
        click.echo(f"set {batch_id} left running; resume with: ldit sample --resume {batch_id} -o {out}", err=True)
    sys.exit(EXIT_INTERRUPTED)


def download(client: Client, batch_id: str, status: dict, out: Path) -> int:
    """Stream the set's .npz into `out` (through a .part file) with a byte bar; its size."""
    part = out.with_name(out.name + ".part")
    expected = int(status.get("bytes") or 0) + 8 * int(status["total"])  # images + labels; headers are extra
    done = 0
    try:
        with client.stream("GET", f"/batches/{batch_id}/samples.npz") as response:
            total = int(response.headers.get("content-length") or 0) or expected or None
            with open(part, "wb") as f, bar(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                            desc="download") as pbar:
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if pbar.total is not None and done > pbar.total:
                        pbar.total = done
                    pbar.update(len(chunk))
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)
    return done


# -- status, watch --------------------------------------------------------------------------------
@cli.command()
@click.pass_obj
def status(client: Client) -> None:
    """The service: its model, live workers, and queue."""
    try:
        card = client.json("GET", "/v1/model")
    except ApiError as err:
        fail(str(err))
    click.echo(f"service  {client.url}")
    click.echo(f"model    {card['name']} version {card['version']}: {card['num_classes']} classes, "
               f"{card['resolution']}x{card['resolution']}, presets {', '.join(card['presets'])} "
               f"(default {card['default_preset']})")
    workers = card.get("workers") or []
    click.echo(f"workers  {len(workers)} live" + ("" if workers else " (none: requests wait or get 503)"))
    for w in workers:
        click.echo(f"  {w['name']}: {w['backend']} {w['precision']} on {w['device']}, version {w['model_version']}, "
                   f"{w.get('active', 0)} active, heartbeat {w['age_s']:.1f} s ago")
    click.echo(f"queue    {queue_depth(client)}")


def queue_depth(client: Client) -> str:
    try:
        text = client.request("GET", "/metrics").text
    except ApiError as err:
        return f"unknown ({err})"
    for line in text.splitlines():
        if line.startswith("ldit_inference_pending_request_count "):
            return f"{float(line.split()[1]):.0f} interactive jobs waiting or running"
    return "unknown (no ldit_inference_pending_request_count on /metrics)"


@cli.command()
@click.argument("job_id")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also download the image once done.")
@click.pass_obj
def watch(client: Client, job_id: str, out: Path | None) -> None:
    """Follow a job (from POST /jobs) through its live events, as a bar of its denoising steps."""
    ended = None
    try:
        with client.stream("GET", f"/jobs/{job_id}/events", timeout=None) as response, \
                bar(total=None, unit="step", desc=f"job {job_id[:12]}") as pbar:
            for event, data in sse_events(response):
                if event == "queued":
                    eta = data.get("estimated_start_s")
                    pbar.set_description_str(f"job {job_id[:12]} queued (position {data.get('position')}"
                                             + (f", starts in ~{eta:.0f} s)" if eta is not None else ")"))
                elif event == "progress":
                    if pbar.total != data["steps"]:
                        pbar.total = data["steps"]
                        pbar.set_description_str(f"job {job_id[:12]}")
                    pbar.update(data["step"] - pbar.n)
                elif event in ("done", "failed"):
                    if event == "done" and pbar.total:
                        pbar.update(pbar.total - pbar.n)
                    ended = (event, data)
                    break
    except KeyboardInterrupt:
        click.echo(f"\nstopped watching; job {job_id} goes on", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except ApiError as err:
        fail(str(err))
    if ended is None:
        fail(f"the event stream of job {job_id} ended without its end")
    event, data = ended
    if event == "failed":
        fail(f"job {job_id} failed: {data.get('error')}: {data.get('message')}")
    click.echo(f"job {job_id} done: {data.get('image_url')} (queue {data.get('queue_ms')} ms, "
               f"compute {data.get('compute_ms')} ms, cache {data.get('cache')})")
    if out is not None:
        suffix = out.suffix.lower().lstrip(".")
        fmt = {"jpg": "jpeg"}.get(suffix, suffix)
        accept = f"image/{fmt}" if fmt in FORMATS else "image/png"
        try:
            blob = client.request("GET", data.get("image_url") or f"/jobs/{job_id}/image",
                                  headers={"Accept": accept}).content
        except ApiError as err:
            fail(str(err))
        out.write_bytes(blob)
        click.echo(f"wrote {out} ({len(blob):,} bytes)")


def main() -> None:
    cli(prog_name="ldit")


if __name__ == "__main__":
    main()
