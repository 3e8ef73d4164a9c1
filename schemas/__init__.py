"""Arrow schemas, defined once per corpus; Spark types are derived from them."""
