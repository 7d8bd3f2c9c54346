"""Tokenizer (cifar10 recipe) images/s on the CIFAR-10 JPEG folder: with a cold cache (decode
included), warm, and on an in-memory copy of the same pixels (what torchvision's CIFAR10 gives)."""
import shutil, tempfile, time, dataclasses
import torch
torch.set_num_threads(1)
from recipes.recipe import load_recipe
from vqdiff.data import ImageSet, load_dataset, resolve_cache_dir
from vqdiff.tokenizer import VQTokenizer
from vqdiff.distributed import seeded
from vqdiff.train import train

r = load_recipe("cifar10", ["data.dataset=folder", "data.path=/work/shared/data/cifar10-jpeg"])
STEPS = 12
def run(get_data, label):
    t0 = time.perf_counter()
    data = get_data()
    t_load = time.perf_counter() - t0
    cfg = dataclasses.replace(r.train_config("tokenizer"), steps=STEPS, log_every=STEPS, checkpoint_every=10**6)
    with seeded(0):
        m = VQTokenizer(r.model_config("tokenizer", channels=3, image_size=32))
    with tempfile.TemporaryDirectory() as d:
        t1 = time.perf_counter()
        train(m, data, cfg, d, device="cpu")
        t_train = time.perf_counter() - t1
    per_step = t_train / STEPS
    epoch = len(data) / 128 * per_step
    print(f"{label}: load {t_load:.1f}s, {128 / per_step:.0f} images/s in training; "
          f"one epoch incl. load: {len(data) / (t_load + epoch):.0f} images/s", flush=True)
    return data

shutil.rmtree(resolve_cache_dir() / "folders", ignore_errors=True)
folder = run(lambda: load_dataset("folder", "train", path="/work/shared/data/cifar10-jpeg"), "folder, cold cache (first epoch)")
run(lambda: load_dataset("folder", "train", path="/work/shared/data/cifar10-jpeg"), "folder, warm cache (later epochs, later runs)")
mem = ImageSet("in-memory", "train", 32, 3, 10, folder.labels.clone(), uint8=folder.uint8.clone())
run(lambda: mem, "in-memory tensor (as torchvision CIFAR10)")
