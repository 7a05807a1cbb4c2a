"""Layer ``cli``: the ``tetherlab`` command's argument parsing and printing, nothing else.

``main`` (cluster set-up, ``master``, ``up``, status, backup/restore, demo, bench, drill, sim)
and ``admin`` (keys, concepts, intents, cluster membership) call the layers below and print
what they return. Nothing imports this package; it may import anything (the ``tether``
command's parser is ``tetherlab.shim.cli``, which belongs to this layer too). Imports of
heavy modules happen inside the command functions, so ``tetherlab --help`` starts fast.
"""
