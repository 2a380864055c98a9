"""The wire contract: messages decoded once, at the edge, into typed values; replies encode themselves.

bytes -> orjson -> JSON Schema (the files in `schemas/`, compiled once with fastjsonschema)
-> limits -> frozen dataclass. Past `decode_command` / `decode_query` no code touches a raw
dict. Every failure is an `InvalidRequest` (wire code `invalid_request`) whose message
names what is wrong and where; when one item of an `add` (or one id of a `delete`/`get`)
is to blame, the error's `item` is its position.

Runtime schema vs published schema. The worker compiles the published schemas with three
subschemas of per-item vector data relaxed, because checking them per element in the
validator costs a large share of adding the vectors to the index (about 8 ms per
1000 x 128 `add`, against 1 ms for the rest). The same rules are enforced in code, at least
as strictly:

- `vector` ("array of numbers, at least one"): the rows are converted by numpy in one call
  and rejected unless numpy infers a numeric dtype (strings, nulls, nested arrays fail);
  booleans, which numpy would read as 0/1, are looked for in the rows holding an exact 0.0
  or 1.0 (JSON Schema does not count `true` as a number).
- `vector_b64` (pattern of the base64 alphabet): decoded with `binascii.a2b_base64` in
  strict mode, which refuses any character outside the alphabet and misplaced padding.
- the item `oneOf` (exactly one of `vector` and `vector_b64`; for a search, of `vector`,
  `vector_b64`, `vectors` and `vectors_b64`): checked in code, with a message saying which.

Limits (`MessageLimits`) are configurable, so the schemas carry no upper bounds that are
limits (items per command, ids, dim, id length, k); their descriptions give the defaults.
Vectors must also be finite: NaN and infinities are rejected here (a JSON number too large
for float32 becomes infinite and is rejected too); the index checks them again with the
dimension, which messages do not know.

Before the schema or anything else walks a body, its nesting is checked against
`max_json_depth` without recursion (`_check_depth`): a deep `filter` or `metadata` would
otherwise fail later, in orjson (which writes at most 254 levels) or in recursive code,
as an error that is not the request's. Any `RecursionError` or `UnicodeError` that still
escapes decoding is the request's fault and becomes `InvalidRequest` too. Error messages
name a request's values cut short, never in full.

Conventions:

- `deadline_ms` is absolute Unix time in milliseconds (UTC epoch), as the requester's
  clock sees it; a request not answered by then gets `deadline_exceeded`.
- A correlation id is opaque bytes on the wire (header `kafka_correlationId`, and the key
  of the reply record); in reply and ack bodies it is the UTF-8 text when the bytes are
  valid UTF-8, else their lowercase hex. Requesters match replies on the header, never on
  the body field.
- Integers the schema calls `integer` may arrive as integral floats (`10.0`, as JSON
  Schema allows); they are decoded to `int`.


Modules: `commands` and `queries` (typed values and their decoders), `replies`
(replies and acks that encode themselves), `headers` (Spring request/reply headers, the
DLQ header set), `topics` (topic names, the reply-topic policy, the home partition of an
index), `limits`, `schemas` (the published JSON Schemas, compiled once) and `vectors`.
Nothing here imports an engine, S3 or metrics.
"""
