"""The exercise sheets: the files `tinygpt exercise start NAME` writes, one per exercise (the
warm-ups for the small ops and the MLP, the fused ops, the block).

Each sheet holds the forward in plain NumPy, the shapes, the math of the forward, and a
`backward` that raises NotImplementedError. The checker also imports the sheets here for
the reference forward (the learner's copy may have been changed)."""
