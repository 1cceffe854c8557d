"""Every model module with parallel plans; importing this registers them all in `imagine.parallel.registry`
(which imports it lazily, on the first plan lookup). A new model family with a plan adds its module here."""

from imagine.models.ltx2 import parallel as ltx2_parallel
from imagine.models.wan import parallel as wan_parallel

__all__ = ["ltx2_parallel", "wan_parallel"]
