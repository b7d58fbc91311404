"""Train the small CIFAR-10 encoder the quality benchmark and tests use as "a user's trained
model", offline, on CPU, and export it as TorchScript.

The network is a 6-layer VGG-style CNN (widths 32/64/128, batch norm, ~0.29 M parameters)
trained on the CIFAR-10 *train* split in ``../shared/data/cifar10`` with random crops and
flips, SGD + one-cycle learning rate and label smoothing. The exported program is the
feature extractor only -- what the job's ``embedder: {model: torchscript}`` contract wants:
a float (N, 3, S, S) ImageNet-normalised batch in, (N, 128) penultimate features out.
Test-split accuracy (of the classifier head, which is not exported) is written beside it.

    python benchmarks/train_cifar_encoder.py            # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "cifar10")
OUT = os.path.join(ROOT, "benchmarks", "models", "cifar10_cnn.pt")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # the job's normalisation
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All of one split's JPEGs as (N, 32, 32, 3) uint8 and integer labels (classes sorted)."""
    from PIL import Image

    images, names = [], []
    with tarfile.open(os.path.join(DATA, f"{split}.tar.gz")) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                names.append(member.name.split("/")[-2])
    classes = sorted(set(names))
    return np.stack(images), np.array([classes.index(n) for n in names]), classes


class Encoder(nn.Module):
    """Convolutional trunk -> global average pool -> 128-d features."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        w = width
        self.trunk = nn.Sequential(block(3, w), block(w, w), nn.MaxPool2d(2), block(w, 2 * w), block(2 * w, 2 * w),
                                   nn.MaxPool2d(2), block(2 * w, 4 * w), block(4 * w, 4 * w),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - MEAN) / STD).contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 4-px-padded crops and horizontal flips, on a normalised batch."""
    n = x.shape[0]
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, n), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out.contiguous(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    train_x, train_y, classes = load_split("train")
    test_x, test_y, test_classes = load_split("test")
    assert classes == test_classes, (classes, test_classes)
    train_t, test_t = to_tensor(train_x), to_tensor(test_x)
    train_l = torch.from_numpy(train_y)
    print(f"loaded {len(train_y)} train / {len(test_y)} test images in {time.perf_counter() - t0:.0f} s")

    encoder = Encoder()
    head = nn.Linear(encoder.dim, len(classes))
    model = nn.Sequential(encoder, head).to(memory_format=torch.channels_last)
    steps = args.epochs * (len(train_y) // args.batch)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=0.2, total_steps=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        t = time.perf_counter()
        total = 0.0
        for b in range(len(train_y) // args.batch):
            idx = order[b * args.batch:(b + 1) * args.batch]
            loss = loss_fn(model(augment(train_t[idx], generator)), train_l[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / (b + 1):.3f}, {time.perf_counter() - t:.0f} s", flush=True)

    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(test_t[i:i + 1000]) for i in range(0, len(test_y), 1000)])
    accuracy = float((logits.argmax(1).numpy() == test_y).mean())
    encoder = encoder.to(memory_format=torch.contiguous_format).eval()
    scripted = torch.jit.script(encoder)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "wb") as fh:
        fh.write(buffer.getvalue())
    info = {"test_accuracy": round(accuracy, 4), "epochs": args.epochs, "feature_dim": encoder.dim,
            "parameters": sum(p.numel() for p in encoder.parameters()), "bytes": len(buffer.getvalue()),
            "train_seconds": round(time.perf_counter() - t0), "classes": classes,
            "input": "float (N, 3, 32, 32), ImageNet mean/std normalised", "torch": torch.__version__}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(info, fh, indent=1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
