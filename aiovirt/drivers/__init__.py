"""Hypervisor backends behind :class:`~aiovirt.Connection` (see :mod:`aiovirt.drivers._base`).

- :mod:`aiovirt.drivers.qemu`: local QEMU processes (``qemu:///embed``, ``session``, ``system``);
- :mod:`aiovirt.drivers.test`: an in-memory host for test suites (``test:///default``, ``test:///empty``).
"""
