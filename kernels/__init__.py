"""The recurrences as reusable pieces: each a graph fragment (built on edgeseq.graph.GraphBuilder)
and a plain numpy reference that the tests hold the graphs to."""
