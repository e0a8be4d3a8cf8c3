"""Image folders in ImageNet layout (``<split>/<class>/<image>``): classes, transforms and loaders."""
import io
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageDataset,
    auto_augment,
    create_dataset,
    create_transform,
)
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils import natural_key
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .errors import UsageError

IMAGE_EXTENSIONS = get_img_extensions(as_set=True)  # what timm's folder reader loads


def list_classes(root: str, splits: Sequence[str] = ("train", "val")) -> List[str]:
    """The class folders of each split of ``root``: none empty, and the same in every split.

    timm's folder reader numbers only the classes it finds images for, so an empty class folder would shift every
    later label; it is an error here instead.
    """
    if not os.path.isdir(root):
        raise UsageError(f"data directory {root} does not exist")
    classes = {}
    for split in splits:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UsageError(f"data directory {root} has no {split}/ folder (expected {split}/<class>/<image>)")
        names = sorted((d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))), key=natural_key)
        if not names:
            raise UsageError(f"{folder} has no class folders")
        for name in names:
            if not has_images(os.path.join(folder, name)):
                raise UsageError(f"class folder {os.path.join(folder, name)} has no images")
        classes[split] = names
    return same_classes(classes, root)


def has_images(folder: str) -> bool:
    """Whether ``folder`` holds an image at any depth (timm's reader follows links too)."""
    return any(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
               for _, _, files in os.walk(folder, followlinks=True) for name in files)


def same_classes(classes: Dict[str, List[str]], root: str) -> List[str]:
    """The class names of every split (split -> names), which must be the same."""
    first, *others = classes
    for split in others:
        if classes[split] != classes[first]:
            differ = sorted(set(classes[first]) ^ set(classes[split]))
            raise UsageError(f"{first} and {split} of {root} have different classes: {', '.join(differ[:5])}")
    return classes[first]


def _posterize_increasing(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """RandAugment's increasing posterize keeps 0 bits at magnitude 10, which m9 with magnitude noise reaches.
    Pillow >= 12 rejects 0 bits; older Pillow, which the paper's recipe ran on, returned a black image."""
    if bits_to_keep == 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def train_transform(img_size: int, *, scale: Tuple[float, float], ratio: Tuple[float, float], hflip: float,
                    auto_augment_policy: Optional[str], interpolation: str, reprob: float):
    """Random resized crop, flip, RandAugment (``auto_augment_policy``, None for none) and random erasing."""
    if auto_augment_policy is not None:
        # Installed here, where a training transform is built, rather than when the module is imported.
        auto_augment.NAME_TO_OP["PosterizeIncreasing"] = _posterize_increasing
    return create_transform(img_size, is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
                            color_jitter=None, auto_augment=auto_augment_policy, interpolation=interpolation,
                            re_prob=reprob, re_mode="pixel", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def check_augment_policy(policy: str) -> None:
    """``--aa``: a policy string timm's transforms take (timm asserts on others when the transform is built)."""
    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except (AssertionError, KeyError, ValueError):
        raise UsageError(f"argument --aa: {policy!r} is no timm auto-augment policy (rand-m9-mstd0.5-inc1, "
                         f"augmix-m5-w4-d2, original, v0, 3a, ... or none)") from None


def eval_transform(img_size: int, *, interpolation: str, crop_pct: float):
    """Resize to ``img_size / crop_pct``, then center crop ``img_size``."""
    return create_transform(img_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def image_folder(root: str, split: str, transform, classes: Optional[Sequence[str]] = None) -> Dataset:
    """The images of ``root/split``, each labelled by its top-level class folder (of ``classes``, by default every
    class folder) at any depth below it, as torchvision's ImageFolder does: timm's reader labels by the innermost
    folder, which would make ``a/c/x.png`` class c. Images directly in ``root/split`` belong to no class."""
    folder = os.path.join(root, split)
    dataset = create_dataset("", root=folder, search_split=False, transform=transform)
    class_to_idx = {name: i for i, name in enumerate(classes or list_classes(root, (split,)))}
    labelled = ((path, os.path.relpath(path, folder).split(os.sep)[0]) for path, _ in dataset.reader.samples)
    dataset.reader.samples = [(path, class_to_idx[name]) for path, name in labelled if name in class_to_idx]
    dataset.reader.class_to_idx = class_to_idx
    return dataset


def label_by_top_folder_in_tar(dataset: ImageDataset) -> None:
    """Labels the images of a tar split by their top-level folder in the tar, as ``image_folder`` does (timm's tar
    reader labels by the innermost one); images at the top of the tar belong to no class."""
    reader = dataset.reader
    tops = [os.path.normpath(sample[0].path).split("/") for sample in reader.samples]
    class_to_idx = {c: i for i, c in enumerate(sorted({top[0] for top in tops if len(top) > 1}, key=natural_key))}
    keep = [i for i, top in enumerate(tops) if len(top) > 1]
    reader.samples = [reader.samples[i] for i in keep]
    reader.targets = np.array([class_to_idx[tops[i][0]] for i in keep], dtype=reader.targets.dtype)
    reader.class_name_to_idx = class_to_idx


def open_splits(name: str, root: str, transforms: Dict[str, Any]) -> Tuple[Dict[str, ImageDataset], List[str]]:
    """The splits (split -> transform) of a data set through timm's ``create_dataset``, and its class names.

    ``name`` "" is timm's default reader: ``<root>/<split>.tar`` (a tar of ``<class>/<image>``) where that file
    exists, else the folder ``<root>/<split>/<class>/<image>``. Another name (``hfds/...``) goes to
    ``create_dataset`` with ``root`` and the split. Only map-style datasets fit: the trainer orders each epoch's
    samples itself and scans every image before training, which streaming readers (wds/, tfds/, hfids/) do not
    allow.
    """
    tars = {split: os.path.join(root, f"{split}.tar") for split in transforms}
    if not name and not all(os.path.isfile(tar) for tar in tars.values()):
        given = [split for split, tar in tars.items() if os.path.isfile(tar)]
        missing = [split for split in transforms if split not in given and not os.path.isdir(os.path.join(root, split))]
        if given and missing:
            raise UsageError(f"data directory {root} has {', '.join(s + '.tar' for s in given)} but no "
                             f"{', '.join(s + '.tar' for s in missing)} (a tar of <class>/<image> per split, or "
                             f"a folder per split)")
        classes = list_classes(root, splits=tuple(transforms))
        return {split: image_folder(root, split, tf, classes) for split, tf in transforms.items()}, classes
    datasets, classes = {}, {}
    for split, transform in transforms.items():
        try:
            if name:
                dataset = create_dataset(name, root=root, split=split, transform=transform)
            else:
                dataset = create_dataset("", root=tars[split], search_split=False, transform=transform)
        except tarfile.ReadError as e:
            raise UsageError(f"{tars[split]} is not a readable tar file ({e})") from None
        except (AssertionError, ImportError, RuntimeError, ValueError) as e:  # what timm raises for a bad name/root
            raise UsageError(f"--dataset {name!r} cannot open split {split} of {root}: {e}") from None
        if not isinstance(dataset, ImageDataset):
            raise UsageError(f"--dataset {name!r} is not a map-style timm ImageDataset (streaming and torchvision "
                             f"datasets are not supported)")
        if not name:
            label_by_top_folder_in_tar(dataset)
        mapping = getattr(dataset.reader, "class_to_idx", None) or getattr(dataset.reader, "class_name_to_idx", {})
        classes[split] = sorted(mapping, key=mapping.get)
        datasets[split] = dataset
    return datasets, same_classes(classes, root)


def decodes(data: bytes) -> bool:
    """Whether PIL decodes the whole image, as the loader will (a JPEG at 1/8 scale: every byte is still read,
    so a truncated file fails, at a fraction of the cost)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return True
    except Exception:  # PIL raises many kinds for a broken file (OSError, SyntaxError, ValueError, struct.error)
        return False


def scan(dataset, threads: int) -> List[Tuple[bool, int]]:
    """(decodes, label) of every image of a timm ``ImageDataset``.

    Files are read one at a time (a tar reader shares one open file) and decoded in ``threads`` threads (PIL
    releases the GIL while it decodes).
    """
    lock = threading.Lock()

    def check(index: int) -> Tuple[bool, int]:
        with lock:
            try:
                sample, label = dataset.reader[index][:2]
                if hasattr(sample, "read"):  # the folder and tar readers give an open file
                    with sample:
                        sample = sample.read()
            except OSError:  # a file that cannot be opened or read, such as a dangling symbolic link
                return False, -1
        # Other readers (hfds/) may give the bytes, or an image their library has decoded already.
        return decodes(sample) if isinstance(sample, bytes) else True, int(label)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(check, range(len(dataset))))


def drop_undecodable(splits: Dict[str, Dataset], classes: Sequence[str], *, skip: bool,
                     threads: int) -> Tuple[Dict[str, Dataset], List[str]]:
    """Scans every image of every split before training: (each split without its undecodable images, their names).

    Undecodable images are an error naming and counting them unless ``skip``; then they are left out, so that no
    stand-in sample is trained on or counted. Every class must keep at least one decodable image in every split.
    """
    kept, bad_names = {}, []
    for split, dataset in splits.items():
        results = scan(dataset, threads)
        good = [i for i, (ok, _) in enumerate(results) if ok]
        bad_names += [dataset.filename(i, absolute=True) for i, (ok, _) in enumerate(results) if not ok]
        present = {results[i][1] for i in good}
        missing = [name for label, name in enumerate(classes) if label not in present]
        if missing:
            raise UsageError(f"{split}/ has no decodable image of class {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
        kept[split] = Subset(dataset, good) if len(good) < len(dataset) else dataset
    if bad_names and not skip:
        count = f"{len(bad_names)} image{'s' if len(bad_names) > 1 else ''}"
        raise UsageError(f"{count} cannot be decoded: {', '.join(bad_names[:5])}"
                         f"{' ...' if len(bad_names) > 5 else ''} (fix or remove them, or give --skip-bad-images "
                         f"to leave them out)")
    return kept, bad_names


def train_loader(dataset: Dataset, *, seed: int, rank: int, world_size: int, batch_size: int, workers: int,
                 pin_memory: bool) -> DataLoader:
    """Shuffled, drop-last batches of this rank's share; ``loader.sampler.set_epoch`` picks the epoch's order.

    The order depends only on (seed, epoch), so a resumed epoch sees the same data as the uninterrupted run.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=pin_memory)


def eval_loader(dataset: Dataset, *, rank: int, world_size: int, batch_size: int, workers: int,
                pin_memory: bool) -> DataLoader:
    """Each rank takes every world_size-th image, so the ranks together see every image exactly once."""
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)
