"""Back end: lowering to secure statements, gate planning, cost model and code generation."""
