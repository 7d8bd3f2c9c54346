"""The Gradio page of `vqdiff demo RUN`: sample a run's generators and watch the diffusion
refine its grid step by step; inpaint or outpaint an uploaded image.

Gradio is an optional extra (`pip install -e ".[demo]"`) and is imported here alone. The page is
local: analytics are off, there is no share link, and the default theme's fonts are bundled with
Gradio (nothing is fetched from another host).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from recipes.recipe import GENERATORS, resolve_options
from recipes.run import Run, StageError
from recipes.sampling import SampleSpec
from vqdiff.checkpoint import CONFIG_FILE
from vqdiff.data import SHAPES_CLASSES, from_uint8, to_uint8
from vqdiff.options import MASK_SAMPLERS, OptionError
from vqdiff.pipeline import box_keep, decode_partial, edit_images, sample_images, side_keep

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this at import
import gradio as gr  # noqa: E402

CLASS_NAMES = {"shapes": SHAPES_CLASSES, "mnist": tuple(str(i) for i in range(10))}
RANDOM_CLASS = "random"
OUTPAINT_SIDES = ("bottom", "right", "top", "left")  # bottom first: the one side AR can fill (a suffix)
MAX_FRAMES = 48  # frames streamed per call at most (AR reports once per token)


# ------------------------------------------------------------------ pictures


def upscale_factor(image_size: int) -> int:
    """Nearest-neighbour magnification of the page's pictures: 32 px images show at 4x."""
    return max(1, 128 // image_size)


def picture(images: torch.Tensor, scale: int, nrow: int | None = None):
    """images float [n c H W] in [-1, 1] -> one PIL grid (grey padding), magnified `scale` times, nearest neighbour."""
    from PIL import Image
    from torchvision.utils import make_grid

    nrow = nrow or math.ceil(math.sqrt(len(images)))
    grid = make_grid(to_uint8(images), nrow=nrow, padding=2, pad_value=128).permute(1, 2, 0).numpy()
    pic = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    # Gradio caches a picture under the hash of its bytes and rewrites that file in place (not
    # atomically): the same picture sent twice (the last step, then the result) could be truncated
    # while the browser reads it. A PNG text chunk unique to each picture gives each its own file.
    pic.info["vqdiff-picture"] = uuid.uuid4().hex
    return pic


def grid_pixels(n: int, image_size: int, nrow: int | None = None) -> tuple[int, int]:
    """(width, height) of `picture` for n images: what the page shows (the browser test checks it)."""
    nrow = min(n, nrow or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    s = upscale_factor(image_size)
    return (nrow * (image_size + 2) + 2) * s, (rows * (image_size + 2) + 2) * s


def to_tensor(image, image_size: int, channels: int) -> torch.Tensor:
    """A PIL image (any size or mode) -> float [1 c S S] in [-1, 1], resized to the run's images."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB").resize((image_size, image_size), Image.BICUBIC)
    t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image_size, image_size, channels)
    return from_uint8(t.permute(2, 0, 1)[None])


# ------------------------------------------------------------------ regions


def region_keep(size: int, mode: str, box: tuple[float, float, float, float], side: str, amount: float) -> torch.Tensor:
    """keep bool [1 S S] (True = keep). inpaint: the box x0, y0, x1, y1 (fractions of the side) is
    regenerated; outpaint: a strip of `amount` of the side is regenerated on `side`."""
    if mode == "inpaint":
        x0, y0, x1, y1 = (round(v * size) for v in box)
        return box_keep(size, min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))[None]
    return side_keep(size, (side,), max(1, round(amount * size)))[None]


def outpaint_shift(images: torch.Tensor, side: str, amount: float) -> torch.Tensor:
    """Move the content away from `side` by `amount` of the image, so that the strip to fill is new
    canvas (grey) and the image's own edge borders it."""
    size = images.shape[-1]
    s = max(1, round(amount * size))
    out = torch.zeros_like(images)
    if side == "bottom":
        out[..., : size - s, :] = images[..., s:, :]
    elif side == "top":
        out[..., s:, :] = images[..., : size - s, :]
    elif side == "right":
        out[..., :, : size - s] = images[..., :, s:]
    else:
        out[..., :, s:] = images[..., :, : size - s]
    return out


def masked(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The regenerated region shown grey (0 in [-1, 1])."""
    return torch.where(keep[:, None], images, torch.zeros_like(images))


# ------------------------------------------------------------------ streaming


_DONE = object()


def stream(work: Callable[[Callable[..., None]], Any]) -> Iterator[tuple[str, Any]]:
    """Run work(callback) in a thread; yield ("frame", ids) for the grids it reports (callback(..., ids))
    as they come, then ("done", work's result). An exception in work is raised here."""
    q: queue.Queue = queue.Queue()
    result: dict[str, Any] = {}

    def report(*args: Any) -> None:
        q.put(args[-1].detach().cpu().clone())

    def target() -> None:
        try:
            with torch.inference_mode():
                result["value"] = work(report)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            result["error"] = e
        finally:
            q.put(_DONE)

    thread = threading.Thread(target=target, daemon=True, name="vqdiff-demo-sampler")
    thread.start()
    while (item := q.get()) is not _DONE:
        yield "frame", item
    thread.join()
    if "error" in result:
        raise result["error"]
    yield "done", result["value"]


# ------------------------------------------------------------------ the page


class Demo:
    """The run's models, loaded once, and the functions behind the page's buttons."""

    def __init__(self, run_dir: Path, device: str | None = None):
        self.run = Run(Path(run_dir), device=device or "cpu")
        self.recipe = self.run.read_recipe()  # first: a run folder without a readable recipe.toml is refused in one line
        self.device = self.run.torch_device
        self.tokenizer = self.run.load_tokenizer(self.device).eval()
        self.kinds = [k for k in GENERATORS if (self.run.model_dir(k) / CONFIG_FILE).exists()]
        if not self.kinds:
            raise StageError(f"no generator in {self.run.run_dir}; run `vqdiff train diffusion` (or ar) first")
        self.models = {k: self.run.load_generator(k, self.device).eval() for k in self.kinds}
        self.dataset = self.recipe.data.dataset
        self.image_size = self.recipe.data.image_size
        self.channels = self.tokenizer_channels()
        self.num_classes = max(m.cfg.num_classes for m in self.models.values())
        names = CLASS_NAMES.get(self.dataset, ())
        self.class_names = [names[i] if i < len(names) else str(i) for i in range(self.num_classes)]
        self.default_sampler = resolve_options(self.recipe, "diffusion").sampler
        self.defaults = {k: resolve_options(self.recipe, k) for k in self.kinds}  # each generator's temperature and cfg
        self.scale = upscale_factor(self.image_size)

    def tokenizer_channels(self) -> int:
        with torch.no_grad():
            return decode_partial(self.tokenizer, torch.zeros(1, *self.tokenizer.grid, dtype=torch.long)).shape[1]

    # ------------------------------------------------------------ settings

    def spec(self, kind: str, num: int, temperature: float, steps: float, class_name: str, cfg: float, seed: float, sampler: str) -> SampleSpec:
        """The page's settings as a checked SampleSpec (a StageError names a bad one)."""
        if kind not in self.models:
            raise StageError(f"this run has no {kind} generator; choose {' or '.join(self.kinds)}")
        model = self.models[kind]
        class_ = None
        if class_name not in (None, "", RANDOM_CLASS) and model.cfg.num_classes:
            class_ = self.class_names.index(class_name)
        options = resolve_options(
            self.recipe, kind, temperature=float(temperature), steps=int(steps), sampler=sampler,
            cfg=float(cfg) if model.cfg.num_classes else None,
        )  # fmt: skip
        spec = SampleSpec(generator=kind, options=options, num=int(num), seed=int(seed), class_=class_)
        spec.validate()
        return spec

    def _every(self, spec: SampleSpec) -> int:
        """Stream every k-th frame: every step of the diffusion, at most MAX_FRAMES for AR's one per token."""
        passes = self.models[spec.generator].forward_passes(spec.options)
        return max(1, math.ceil(passes / MAX_FRAMES))

    # ------------------------------------------------------------ sample

    def sample(self, kind, num, temperature, steps, class_name, cfg, seed, sampler) -> Iterator[tuple[Any, Any, str]]:
        """Yields (grid picture, trajectory picture, status) after each step, then the final grid."""
        try:
            spec = self.spec(kind, num, temperature, steps, class_name, cfg, seed, sampler)
        except (StageError, OptionError) as e:
            yield gr.skip(), gr.skip(), f"**error:** {e}"
            return
        model, every = self.models[spec.generator], self._every(spec)
        total = model.forward_passes(spec.options)
        frames: list[torch.Tensor] = []  # the first sample after each streamed step
        t0, step = time.perf_counter(), 0
        work = lambda callback: sample_images(model, self.tokenizer, spec.num, spec.options, labels=spec.class_, seed=spec.seed, callback=callback)  # noqa: E731
        try:
            for what, value in stream(work):
                if what == "frame":
                    step += 1
                    if step % every and step != total:
                        continue
                    images = decode_partial(self.tokenizer, value)
                    frames.append(images[:1])
                    yield picture(images, self.scale), gr.skip(), f"{spec.generator}: step {step}/{total}..."
                else:
                    ids, images = value
        except (StageError, ValueError, TypeError) as e:
            yield gr.skip(), gr.skip(), f"**error:** {e}"
            return
        seconds = time.perf_counter() - t0
        trajectory = picture(torch.cat(frames), self.scale, nrow=len(frames)) if frames else None
        how = f"{spec.options.steps} steps, sampler {spec.options.sampler}" if spec.generator == "diffusion" else "one pass per token"
        yield (
            picture(images, self.scale),
            trajectory,
            f"{spec.num} images from {spec.generator} ({how}, temperature {spec.options.temperature:g}, seed {spec.seed}) in {seconds:.1f} s",
        )

    # ------------------------------------------------------------ edit

    def edit_region(self, image, mode, x0, y0, x1, y1, side, amount) -> tuple[torch.Tensor, torch.Tensor]:
        """(the images to edit float [1 c S S], keep bool [1 S S]) from the page's image and region."""
        if image is None:
            raise StageError("upload an image first (or take the first sample)")
        x = to_tensor(image, self.image_size, self.channels)
        if mode == "outpaint":
            x = outpaint_shift(x, side, float(amount))
        keep = region_keep(self.image_size, mode, (x0, y0, x1, y1), side, float(amount))
        if keep.all():
            raise StageError("the region is empty: make x1 > x0 and y1 > y0")
        return x, keep

    def preview(self, image, mode, x0, y0, x1, y1, side, amount):
        """The image as the generator will see it: the region to regenerate in grey."""
        try:
            x, keep = self.edit_region(image, mode, x0, y0, x1, y1, side, amount)
        except StageError:
            return None
        return picture(masked(x, keep), self.scale)

    def edit(self, image, mode, x0, y0, x1, y1, side, amount, kind, temperature, steps, class_name, cfg, seed, sampler):
        """Yields (picture of [original, masked, result], status) after each step, then the result."""
        try:
            spec = self.spec(kind, 1, temperature, steps, class_name, cfg, seed, sampler)
            x, keep = self.edit_region(image, mode, x0, y0, x1, y1, side, amount)
        except (StageError, OptionError) as e:
            yield gr.skip(), f"**error:** {e}"
            return
        model, shown = self.models[spec.generator], masked(x, keep)
        every, step, t0 = self._every(spec), 0, time.perf_counter()
        work = lambda callback: edit_images(  # noqa: E731
            model, self.tokenizer, x.to(self.device), keep.to(self.device), spec.options, labels=spec.class_, seed=spec.seed, callback=callback
        )
        try:
            for what, value in stream(work):
                if what == "frame":
                    step += 1
                    if step % every == 0:
                        current = decode_partial(self.tokenizer, value)
                        yield picture(torch.cat([x, shown, current]), self.scale, nrow=3), f"{spec.generator}: step {step}..."
                else:
                    _, result = value
        except (StageError, ValueError, TypeError) as e:  # AR: a region that is not a suffix of the raster order
            yield gr.skip(), f"**error:** {e}"
            return
        seconds = time.perf_counter() - t0
        yield (
            picture(torch.cat([x, shown, result.cpu()]), self.scale, nrow=3),
            f"{mode} with {spec.generator} (temperature {spec.options.temperature:g}, seed {spec.seed}) in {seconds:.1f} s",
        )


def build_demo(run_dir: Path | str, device: str | None = None) -> gr.Blocks:
    """The page for RUN: load the tokenizer and generators once (on the CPU unless `device`), and lay out
    the controls, a Sample tab and an Edit tab. Launch it with `.queue().launch(...)`."""
    d = Demo(Path(run_dir), device)
    conditional = d.num_classes > 0
    with gr.Blocks(title=f"vqdiff demo: {d.run.run_dir.name}", analytics_enabled=False) as page:
        gr.Markdown(
            f"## vqdiff demo: `{d.run.run_dir}`\n{d.dataset}, {d.image_size}x{d.image_size} images, "
            f"a {d.tokenizer.grid[0]}x{d.tokenizer.grid[1]} token grid; generators: {', '.join(d.kinds)}. "
            "Steps and the sampler are the diffusion's (AR takes one pass per token)."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                first = "diffusion" if "diffusion" in d.kinds else d.kinds[0]
                kind = gr.Radio(d.kinds, value=first, label="generator", elem_id="generator")
                sampler = gr.Dropdown(list(MASK_SAMPLERS), value=d.default_sampler, label="sampler (diffusion)", elem_id="sampler")
                temperature = gr.Slider(0.0, 2.0, value=d.defaults[first].temperature, step=0.05, label="temperature (0 = argmax)", elem_id="temperature")
                steps = gr.Slider(1, 64, value=8, step=1, label="steps (diffusion)", elem_id="steps")
                class_name = gr.Dropdown([RANDOM_CLASS, *d.class_names], value=RANDOM_CLASS, label="class", visible=conditional, elem_id="class")
                cfg = gr.Slider(1.0, 8.0, value=d.defaults[first].cfg, step=0.5, label="CFG scale (1 = none)", visible=conditional, elem_id="cfg")
                seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
            with gr.Column(scale=3):
                with gr.Tab("Sample", elem_id="tab-sample"):
                    num = gr.Slider(1, 16, value=4, step=1, label="images", elem_id="num")
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    status = gr.Markdown(elem_id="sample-status")
                    grid = gr.Image(label="samples", type="pil", format="png", interactive=False, elem_id="sample-output")
                    trajectory = gr.Image(label="the first sample after each step", type="pil", format="png", interactive=False, elem_id="trajectory")
                with gr.Tab("Edit", elem_id="tab-edit"):
                    with gr.Row():
                        source = gr.Image(label="image to edit", type="pil", sources=["upload", "clipboard"], image_mode="RGB", height=240, elem_id="edit-input")
                        preview = gr.Image(label="region to regenerate (grey)", type="pil", format="png", interactive=False, elem_id="edit-preview")
                    take = gr.Button("Use the first sample", elem_id="take-sample")
                    mode = gr.Radio(["inpaint", "outpaint"], value="inpaint", label="mode", elem_id="edit-mode")
                    with gr.Row():
                        x0 = gr.Slider(0, 1, value=0.25, step=0.125, label="x0", elem_id="x0")
                        y0 = gr.Slider(0, 1, value=0.25, step=0.125, label="y0", elem_id="y0")
                        x1 = gr.Slider(0, 1, value=0.75, step=0.125, label="x1", elem_id="x1")
                        y1 = gr.Slider(0, 1, value=0.75, step=0.125, label="y1", elem_id="y1")
                    with gr.Row():
                        side = gr.Dropdown(list(OUTPAINT_SIDES), value="bottom", label="outpaint side", elem_id="side")
                        amount = gr.Slider(0.125, 0.75, value=0.25, step=0.125, label="outpaint amount", elem_id="amount")
                    run_edit = gr.Button("Inpaint / outpaint", variant="primary", elem_id="edit")
                    edit_status = gr.Markdown(elem_id="edit-status")
                    edited = gr.Image(label="original | input | result", type="pil", format="png", interactive=False, elem_id="edit-output")
        settings = [kind, temperature, steps, class_name, cfg, seed, sampler]
        # a generator's own temperature and guidance (its recipe section) when it is chosen
        kind.change(lambda k: (d.defaults[k].temperature, d.defaults[k].cfg), kind, [temperature, cfg], show_progress="hidden")
        generate.click(d.sample, [kind, num, temperature, steps, class_name, cfg, seed, sampler], [grid, trajectory, status])
        region = [source, mode, x0, y0, x1, y1, side, amount]
        for control in region:
            control.change(d.preview, region, preview, show_progress="hidden")

        def first_sample(g):
            if g is None:
                return None
            s = d.image_size * d.scale  # the top-left image of the grid, at its own size
            pad = 2 * d.scale
            from PIL import Image

            return g.crop((pad, pad, pad + s, pad + s)).resize((d.image_size, d.image_size), Image.NEAREST)

        take.click(first_sample, grid, source)
        run_edit.click(d.edit, [*region, *settings], [edited, edit_status])
    return page
