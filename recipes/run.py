"""The run folder as one object: its paths, the hashes of its weights, its caches and its models.

RUN/
  recipe.toml                      the resolved recipe
  tokenizer/ ar/ diffusion/        config.json, model.safetensors, train_state.pt, log.jsonl, metrics.json
  decoder/                         the refined decoder (with the tokenizer's frozen encoder and codebook), base.json
  tokens/                          train.safetensors, test.safetensors, meta.json
  samples/GENERATOR-tTEMP-sSTEPS/  PNGs, grid.png, ids.safetensors, sample.json, trajectory.gif (diffusion)
  report/                          report.md, report.json, context.json, plots

Every cache in a run folder is a JSON marker that records the inputs (`key`) that produced the files
beside it: `Run.fresh(path, key)` reads one, `Run.cached(path, key, compute)` computes a value once.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

from recipes.recipe import Recipe, check_generator, load_recipe
from vqdiff.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model, read_config
from vqdiff.io import atomic_write, file_digest, load_tensors, read_json, write_json
from vqdiff.data import ImageSet, load_dataset, save_tokens
from vqdiff.distributed import barrier, is_main, local_device
from vqdiff.pipeline import encode


BASE_FILE = "base.json"  # RUN/decoder/base.json: {"tokenizer_hash": the tokenizer the decoder refines}


class StageError(Exception):
    """A stage that cannot run as asked; the message is one line."""


def software_versions() -> dict[str, str]:
    """The builds that produced a result: the same seed reproduces bit for bit only under the same
    torch (and the same kind of machine), so reports and metrics record them."""
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()}


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock timings cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Run:
    """One run folder, where its data lives and where to compute."""

    run_dir: Path
    data_root: str | None = None
    device: str | None = None
    _hashes: dict[tuple, str] = field(default_factory=dict, init=False, repr=False)  # (path, mtime, size) -> hash

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)

    @property
    def torch_device(self) -> torch.device:
        return local_device(self.device)  # under torchrun on CUDA: cuda:LOCAL_RANK

    # ------------------------------------------------------------ paths

    @property
    def recipe_path(self) -> Path:
        return self.run_dir / "recipe.toml"

    def model_dir(self, kind: str) -> Path:
        """tokenizer/, ar/ or diffusion/."""
        return self.run_dir / kind

    def weights(self, kind: str) -> Path:
        return self.model_dir(kind) / WEIGHTS_FILE

    def metrics_path(self, kind: str) -> Path:
        return self.model_dir(kind) / "metrics.json"

    @property
    def tokens_dir(self) -> Path:
        return self.run_dir / "tokens"

    def tokens_file(self, split: str) -> Path:
        return self.tokens_dir / f"{split}.safetensors"

    @property
    def tokens_meta_path(self) -> Path:
        return self.tokens_dir / "meta.json"

    @property
    def samples_dir(self) -> Path:
        return self.run_dir / "samples"

    @property
    def report_dir(self) -> Path:
        return self.run_dir / "report"

    # ------------------------------------------------------------ recipe and data

    def read_recipe(self, missing_ok: bool = False) -> Recipe | None:
        """RUN/recipe.toml. A file that cannot be parsed is a RecipeError that names it; a missing one
        is a StageError, or None with missing_ok (the sampling options then have their defaults)."""
        if not self.recipe_path.exists():
            if missing_ok:
                return None
            raise StageError(f"{self.run_dir} is not a run folder (no recipe.toml); train a tokenizer into it first")
        return load_recipe(str(self.recipe_path))

    def write_recipe(self, recipe: Recipe) -> None:
        if not is_main():  # under torchrun: rank 0 writes
            return
        text = recipe.to_toml()
        atomic_write(self.recipe_path, lambda tmp: Path(tmp).write_text(text))

    def load_split(self, recipe: Recipe, split: str) -> ImageSet:
        d = recipe.data
        return load_dataset(
            d.dataset, split, image_size=d.image_size, root=self.data_root, path=d.path or None,
            limit=d.limit_train if split == "train" else d.limit_test, seed=d.seed,
        )  # fmt: skip

    # ------------------------------------------------------------ hashes and caches

    def file_hash(self, path: Path) -> str:
        """sha256 of a weights file (short hex), memoised while the file is unchanged."""
        stat = Path(path).stat()
        memo = (str(path), stat.st_mtime_ns, stat.st_size)
        if memo not in self._hashes:
            self._hashes[memo] = file_digest(path)
        return self._hashes[memo]

    def weights_hash(self, kind: str) -> str:
        """sha256 of RUN/kind/model.safetensors."""
        return self.file_hash(self.weights(kind))

    @property
    def tokenizer_hash(self) -> str:
        return self.weights_hash("tokenizer")

    @staticmethod
    def fresh(path: Path, key: Any) -> dict[str, Any] | None:
        """The JSON marker at `path` when it records `key`, else None (missing, corrupt or stale)."""
        try:
            data = json.loads(Path(path).read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) and data.get("key") == key else None

    def cached(self, path: Path, key: Any, compute: Callable[[], Any]) -> Any:
        """compute(), stored at `path` as {"key": key, "value": ...}, and read back while the key holds."""
        marker = self.fresh(path, key)
        if marker is not None:
            return marker["value"]
        value = compute()  # under torchrun every rank computes (sharded), rank 0 writes
        if is_main():
            write_json(path, {"key": key, "value": value})
        return value

    # ------------------------------------------------------------ models

    def load_tokenizer(self, device: torch.device | str | None = None, refined: bool = True) -> torch.nn.Module:
        """The tokenizer that decodes: RUN/decoder/ when it holds a finished refinement of RUN/tokenizer/
        (the same encoder and codebook, so the same ids), else RUN/tokenizer/; refined=False: always the latter."""
        folder = self.model_dir("decoder") if refined and self.refined() else self.model_dir("tokenizer")
        if not (folder / CONFIG_FILE).exists():
            raise StageError(f"no tokenizer in {self.run_dir}; run `vqdiff train tokenizer` first")
        return load_model(folder, device=device or self.torch_device)

    def refined(self) -> bool:
        """RUN/decoder/ holds a finished decoder refinement (`vqdiff train decoder`) of the tokenizer
        that is there now; one of an older tokenizer is refused in one line."""
        folder = self.model_dir("decoder")
        if not ((folder / "metrics.json").exists() and (folder / WEIGHTS_FILE).exists() and (folder / CONFIG_FILE).exists()):
            return False
        if read_json(folder / BASE_FILE).get("tokenizer_hash") != self.tokenizer_hash:
            raise StageError(f"{folder} refines another tokenizer (retrained since); delete {folder} to refine this one")
        return True

    @property
    def decoding_hash(self) -> str:
        """sha256 of the weights that decode (`load_tokenizer`): a sample cache keys on it."""
        return self.weights_hash("decoder") if self.refined() else self.tokenizer_hash

    def tokenizer_meta(self) -> dict[str, Any]:
        """codebook_size and grid of the run's tokenizer, from its config alone."""
        folder = self.model_dir("tokenizer")
        if not (folder / CONFIG_FILE).exists():
            raise StageError(f"no tokenizer in {self.run_dir}; run `vqdiff train tokenizer` first")
        _, cfg = read_config(folder)
        return {"codebook_size": cfg.codebook_size, "grid": list(cfg.grid)}

    def load_generator(self, kind: str, device: torch.device | str | None = None) -> torch.nn.Module:
        check_generator(kind)
        folder = self.model_dir(kind)
        if not (folder / CONFIG_FILE).exists():
            raise StageError(f"no {kind} generator in {self.run_dir}; run `vqdiff train {kind}` first")
        model = load_model(folder, kind, device or self.torch_device)
        self.check_fits_tokenizer(kind, model.cfg, self.tokenizer_meta())
        self.check_same_tokens(kind)
        return model

    def check_fits_tokenizer(self, kind: str, cfg: Any, tokens_meta: dict[str, Any]) -> None:
        """Refuse a generator whose codebook or grid is not the tokenizer's."""
        grid, where = tuple(tokens_meta["grid"]), self.model_dir(kind)
        if cfg.codebook_size != tokens_meta["codebook_size"] or (cfg.grid_h, cfg.grid_w) != grid:
            raise StageError(
                f"the {kind} generator in {where} expects a {cfg.codebook_size}-code book and a "
                f"{cfg.grid_h}x{cfg.grid_w} grid, but the tokenizer has {tokens_meta['codebook_size']} codes "
                f"and a {grid[0]}x{grid[1]} grid; retrain the {kind} generator (delete {where}) or use another run dir"
            )

    def check_same_tokens(self, kind: str) -> None:
        """Refuse a generator trained on the tokens of another tokenizer (retrained since): its ids mean other codes."""
        path = self.model_dir(kind) / "tokens.json"
        if not path.exists() or not self.weights("tokenizer").exists():
            return
        if read_json(path).get("tokenizer_hash") != self.tokenizer_hash:
            load_tensors(self.weights("tokenizer"))  # a corrupt tokenizer file also changes the hash: name it, not the generator
            raise StageError(
                f"the {kind} generator in {self.model_dir(kind)} was trained on the tokens of another tokenizer "
                f"(retrained since); delete {self.model_dir(kind)} to retrain it"
            )


# ------------------------------------------------------------------ the token cache


def tokens_key(run: Run) -> dict[str, Any]:
    """What RUN/tokens/ is encoded from: the tokenizer, and `flip` when the train split holds mirror images
    too (named only then, so a cache from before the option stays current)."""
    return {"tokenizer_hash": run.tokenizer_hash, **({"flip": True} if run.read_recipe().data.flip else {})}


def tokens_current(run: Run) -> bool:
    """RUN/tokens/ holds both splits, encoded by the tokenizer that is there now, as the recipe asks."""
    if not run.weights("tokenizer").exists():
        return False
    meta = run.fresh(run.tokens_meta_path, tokens_key(run))
    return meta is not None and all(run.tokens_file(s).exists() for s in ("train", "test"))


def encode_dataset(run: Run, on_batch=None) -> dict[str, Any]:
    """Write the token grids of the train and test splits, with labels, to RUN/tokens/; with
    `data.flip` the train split also holds the grids of its images mirrored, after the originals."""
    recipe = run.read_recipe()
    model = run.load_tokenizer(refined=False)
    key = tokens_key(run)
    meta: dict[str, Any] = {
        "tokenizer_hash": run.tokenizer_hash,
        "flip": recipe.data.flip,
        "codebook_size": model.codebook_size,
        "grid": list(model.grid),
        "dataset": recipe.data.dataset,
    }
    for split in ("train", "test"):
        data = run.load_split(recipe, split)
        flips = (False, True) if split == "train" and recipe.data.flip else (False,)
        passes = [encode(model, data, 512, _share(on_batch, i, len(flips)), flip=f) for i, f in enumerate(flips)]
        ids, labels = torch.cat(passes), data.labels.repeat(len(flips))
        save_tokens(run.tokens_file(split), ids, labels, model.codebook_size)
        meta[f"num_{split}"] = len(ids)
        meta["num_classes"] = data.num_classes
    meta["key"] = key  # what `tokens_current` checks
    write_json(run.tokens_meta_path, meta)  # last: its presence means the tokens are complete
    return meta


def _share(on_batch, i: int, parts: int):
    """on_batch(done, n) of pass `i` of `parts` over the same n images, as one count over all of them."""
    return None if on_batch is None else lambda done, n: on_batch(i * n + done, parts * n)


def ensure_tokens(run: Run, on_batch=None) -> dict[str, Any]:
    """RUN/tokens/, encoded now when missing or stale; under torchrun rank 0 encodes, the others wait."""
    if is_main() and not tokens_current(run):
        encode_dataset(run, on_batch)
    barrier()
    return read_json(run.tokens_meta_path)
