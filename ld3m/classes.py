"""Which generator class each data class starts from (LD3M's class mapping).

LD3M initialises the class embedding of every synthetic image from the generator's own row for
the image's class. With a generator trained on the data itself (``ld3m prior``) data class ``k``
is generator class ``k``. With an ImageNet-1k generator (DiT, the CompVis LDM) the data holds a
few ImageNet classes: ImageNette's class 0 (``n01440764``, tench) is ImageNet label 0, its class 1
(``n02102040``, English springer) label 217. :func:`generator_labels` finds the labels:

1. an explicit mapping (``--model.class_map``), one generator label per data class, wins;
2. data classes named by wnid (``ImageNetSubset``, ``TinyImageNet``, an ``ImageFolder`` of
   ``train/<wnid>/``) are looked up in the generator's ``id2label`` when its names are wnids,
   else, for a 1000-class generator, in the standard ImageNet-1k index
   (:func:`ld3m.datamodules.imagenet.imagenet_wnids`);
3. otherwise a generator of exactly the data's class count maps class ``k`` to ``k``;

and anything else is refused with a message naming the flag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["IMAGENET_CLASSES", "generator_labels", "is_wnid"]

#: Classes of an ImageNet-1k generator.
IMAGENET_CLASSES = 1000

_WNID = re.compile(r"n\d{8}")


def is_wnid(name: str) -> bool:
    """Whether ``name`` is a WordNet id such as ``n01440764``."""
    return _WNID.fullmatch(str(name)) is not None


def _wnid_of(label_name: str) -> str | None:
    """The wnid an ``id2label`` entry names (the whole entry, or its first comma-separated
    part), or ``None`` for a plain class name such as ``tench, Tinca tinca``."""
    first = str(label_name).split(",")[0].strip()
    return first if is_wnid(first) else None


def generator_labels(data_classes: Sequence[str], generator_classes: int,
                     id2label: Mapping[int, str] | None = None,
                     class_map: Sequence[int] | None = None) -> tuple[list[int], str]:
    """The generator label of every data class, and how it was found.

    Args:
        data_classes: The data's class names, class ``k`` the ``k``-th (its ``class_names``).
        generator_classes: The generator's number of real classes.
        id2label: The generator's class names by label (a DiT folder's ``id2label``), if any.
        class_map: An explicit generator label per data class.

    Returns:
        ``(labels, how)``: ``labels[k]`` is data class ``k``'s generator label; ``how`` is
        ``explicit``, ``id2label``, ``imagenet-1k`` or ``identity``.

    Raises:
        ValueError: the mapping cannot be found, or ``class_map`` does not fit.
    """
    names = [str(n) for n in data_classes]
    k = len(names)
    if class_map is not None:
        labels = [int(label) for label in class_map]
        if len(labels) != k:
            raise ValueError(f"class_map gives {len(labels)} generator labels but the data has {k} "
                             "classes (one label per data class, in the data's class order)")
        bad = [label for label in labels if not 0 <= label < generator_classes]
        if bad:
            raise ValueError(f"class_map labels {bad} are outside the generator's "
                             f"{generator_classes} classes [0, {generator_classes})")
        return labels, "explicit"
    if names and all(is_wnid(n) for n in names):
        known = {}
        for label, name in (id2label or {}).items():
            wnid = _wnid_of(name)
            if wnid is not None:
                known.setdefault(wnid, int(label))
        how = "id2label"
        if not known and generator_classes == IMAGENET_CLASSES:
            from ld3m.datamodules.imagenet import imagenet_wnids

            known = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
            how = "imagenet-1k"
        if known:
            missing = [n for n in names if n not in known]
            if missing:
                raise ValueError(f"the generator does not know the data's classes "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                                 "(by wnid); pass --model.class_map with one generator label per "
                                 "data class to map them yourself")
            return [known[n] for n in names], how
    if generator_classes == k:
        return list(range(k)), "identity"
    shown = ", ".join(names[:5]) + (" ..." if k > 5 else "")
    raise ValueError(f"the generator has {generator_classes} classes and the data {k} ({shown}), "
                     "not named by ImageNet wnid: which generator class each data class starts "
                     "from is unknown; pass --model.class_map with one generator label per data "
                     "class")
