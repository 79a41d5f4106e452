"""The embedded datasets' specs by name: the generic pipeline looks a dataset up here instead of
naming it. Each dataset module declares its own :class:`~jaxdiff.data.builders.DatasetSpec`
(``digits.SPEC``, ``shapes.SPEC``); a new embedded dataset adds its spec to ``SPECS``.
Any other name is a TFDS dataset prepared in the data dir, or ``folder:PATH``
(:mod:`jaxdiff.data.folder`, a prefix rather than a name, so not here).
"""
from __future__ import annotations

from typing import Optional

from jaxdiff.data import digits as digits_lib
from jaxdiff.data import shapes as shapes_lib
from jaxdiff.data.builders import DatasetSpec

SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (digits_lib.SPEC, shapes_lib.SPEC)}


def spec_of(name: str) -> Optional[DatasetSpec]:
    """The spec of dataset ``name`` (``'shapes'`` or ``'shapes:1.0.0'``), None if it has none."""
    return SPECS.get(name.split(":")[0])
