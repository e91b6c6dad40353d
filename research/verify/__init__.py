"""What checks the engine: the independent JAX reference (:mod:`.reference`, the only module of
the library importing JAX), the one comparison and its tolerance table (:mod:`.compare`),
gradcheck (:mod:`.gradcheck`) and the origin program's per-sample port (:mod:`.origin`)."""
