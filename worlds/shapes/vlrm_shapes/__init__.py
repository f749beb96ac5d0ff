"""The shapes world: vlrm's embedded demo, a separate distribution (``worlds/shapes``) that
plugs into vlrm through the ``vlrm`` entry-point group like any third-party package.

- ``vlrm_shapes.world``: the world (images, captions, parsing), its image source, captioner,
  reward and judge CLIPs, caption statistics, and the ``vlrm shapes`` command.
- ``vlrm_shapes.build``, ``itm``, ``llava``: training its models from scratch.
- ``vlrm_shapes.demo``, ``sweep``: ``vlrm-shapes demo | sweep | build | ...``.
- ``weights/``: the built models (a few MB), so the demo needs no build.
"""
