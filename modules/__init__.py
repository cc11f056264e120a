"""One LightningModule per distillation method: ``from ld3m.modules import DM``."""

from ld3m.modules.base import DistillationModule
from ld3m.modules.datm import DATM
from ld3m.modules.dc import DC, DSA
from ld3m.modules.dd import DD
from ld3m.modules.dm import DM
from ld3m.modules.dq import DQ
from ld3m.modules.ld3m import LD3M
from ld3m.modules.mtt import MTT

__all__ = ["DATM", "DC", "DD", "DM", "DQ", "DSA", "DistillationModule", "LD3M", "MTT"]
