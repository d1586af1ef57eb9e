"""Physics-informed refinement: residual blocks of PDEs, one-shot LSR on them, and I-LSR.

- :mod:`.problem` — the ``pde:`` config section → :class:`PdeProblem` (blocks, points, coefficients)
- :mod:`.equations` — built-in equations (registry :data:`EQUATIONS`); :mod:`.systems` — built-in systems
- :mod:`.components` — named outputs (``pde.outputs``) and blocks of several equations or components
- :mod:`.unknowns` — unknown constants (``pde.unknowns``) linearized with the network
- :mod:`.fields` — :class:`Fields`: exact input derivatives of the network (for user residuals too)
- :mod:`.expressions` — the safe formula evaluator used for coefficients and boundary values
- :mod:`.refine_pde` — :func:`refine_pde`, one-shot LSR on the physics residual
- :mod:`.iterate` — :func:`iterate`, Iterative LSR with L-BFGS alignment
"""

from .equations import EQUATIONS, Equation
from .fields import Fields
from .problem import PdeProblem, parse_problem
from .refine_pde import refine_pde

__all__ = ["EQUATIONS", "Equation", "Fields", "PdeProblem", "parse_problem", "refine_pde"]
