//! The argument keys a tool's input schema declares, as the servers read them: what the loop
//! breaker counts of a call ([`super::admit`]). The Python SDK's servers (pydantic) and the
//! TypeScript SDK's (zod) ignore a key the tool's `inputSchema` does not declare, so a call
//! with a junk key added (`{"a": 9, "b": 1, "nonce1": 1}`) runs the very call without it: an
//! agent that added another junk key to every call was never counted as repeating itself (an
//! attacker's review). Where the gateway knows the tool's definition (the approved one of its
//! pin), the breaker counts only the keys the schema declares, each under the declared name a
//! server reads it as.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::keys::folded;

/// Keywords of an input schema that let a key its `properties` do not name be read as part of
/// the call: a schema with any of them counts every key, as without a known definition.
/// (`additionalProperties` and `unevaluatedProperties` do unless they are `false`.)
const OPENING: &[&str] = &[
    "patternProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "$ref",
    "$dynamicRef",
    "$recursiveRef",
    "if",
    "then",
    "else",
    "dependentSchemas",
    "dependencies",
];

/// The top-level argument keys an input schema declares (its `properties` and `required`),
/// when it allows no other: made once per pinned definition ([`super::pins::Pin`]).
#[derive(Debug, Default)]
pub struct ArgumentKeys {
    /// The declared names.
    names: HashSet<String>,
    /// A declared name by its spelling as Go's `encoding/json` folds it ([`folded`]); `None`
    /// where two declared names fold alike (`a` and `A`).
    folded: HashMap<String, Option<String>>,
    /// A declared name with `_` by its camel-case form (`file_path` by `filePath`).
    camel: HashMap<String, String>,
    /// The most characters of a declared name, or of its camel-case form.
    max_chars: usize,
    /// By declared name, the keys its value declares in turn, where its schema is an object
    /// (or a list of objects, or either or `null`) that allows no other: pydantic ignores a
    /// key a nested model does not declare, as zod does (a later review nested the junk key,
    /// `{"opts": {"path": "/x", "n0": 0}}`, then `n1`...).
    nested: HashMap<String, ArgumentKeys>,
}

/// How deep declared keys are followed into nested schemas (and local `$ref`s, which may
/// name themselves).
const MAX_NESTING: usize = 8;

/// How many nested objects' keys are made for one definition, at most: a `$ref` may be named
/// by many properties of what it names, and followed to every depth those made a tree
/// exponential in the depth (ten properties naming their own model: 10^8 objects). Past it,
/// a nested object counts every key, as one whose schema is not known.
const MAX_NESTED: usize = 256;

/// What a key of a call's arguments is to a server, by [`ArgumentKeys::reads`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read<'s> {
    /// The declared name, or a spelling Go's `encoding/json` reads as it (`A` for `a`,
    /// `ſql` for `sql`): counted as that name.
    Name(&'s str),
    /// A spelling Go reads as two declared names (the schema declares `a` and `A`): counted
    /// as spelled.
    Spelled,
    /// Another case of a declared name, which pydantic reads as the field by its name beside
    /// its alias (`alias_generator=to_camel, populate_by_name=True`): the snake-case form of a
    /// declared camel-case name (`file_path` for `filePath`), or the camel-case form of a
    /// declared snake-case one (`filePath` for `file_path`). Counted as that name, unless the
    /// name itself (or a spelling Go reads as it) is there too: then no server reads it as the
    /// field, or one whose schema names its fields by name and its alias wins, and the breaker
    /// counts one call where that server sees two (its safe side). A junk key beside each
    /// call's name (`{"file_path": "/a", "filePath": 1}`, then `2`...) is another call to no
    /// server.
    Alias(&'s str),
}

/// `key` in camel case as pydantic's `to_camel` writes a snake-case name: a `_` between two
/// ASCII letters or digits dropped and the character after it upper-cased (`file_path` is
/// `filePath`; `_x`, `x_` and `a__b` stay as they are).
fn camel(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut chars = key.chars().peekable();
    let mut prev: Option<char> = None;
    while let Some(c) = chars.next() {
        if c == '_'
            && prev.is_some_and(|p| p.is_ascii_alphanumeric())
            && let Some(&next) = chars.peek()
            && next.is_ascii_alphanumeric()
        {
            chars.next();
            out.push(next.to_ascii_uppercase());
            prev = Some(next);
            continue;
        }
        out.push(c);
        prev = Some(c);
    }
    out
}

impl ArgumentKeys {
    /// The keys `tool`'s `inputSchema` declares, or `None` when it allows others (it declares
    /// no `properties`, or says `additionalProperties` or `unevaluatedProperties` other than
    /// `false`, or `patternProperties`, or combines subschemas that may declare more): then
    /// every key is part of the call.
    pub fn of(tool: &Value) -> Option<Self> {
        let schema = tool.get("inputSchema")?;
        Self::of_schema(schema.as_object()?, schema, 0, &mut { MAX_NESTED })
    }

    /// The keys an object's schema declares, `$ref`s read against `root`; `left`: how many
    /// nested objects' keys may still be made ([`MAX_NESTED`]).
    fn of_schema(
        schema: &serde_json::Map<String, Value>,
        root: &Value,
        depth: usize,
        left: &mut usize,
    ) -> Option<Self> {
        let properties = schema.get("properties")?.as_object()?;
        let closed = |k: &str| schema.get(k).is_none_or(|v| *v == Value::Bool(false));
        if !closed("additionalProperties")
            || !closed("unevaluatedProperties")
            || OPENING.iter().any(|k| schema.contains_key(*k))
        {
            return None;
        }
        let required = schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str);
        let mut keys = Self::default();
        for name in properties.keys().map(String::as_str).chain(required) {
            if !keys.names.insert(name.to_owned()) {
                continue;
            }
            keys.max_chars = keys.max_chars.max(name.chars().count());
            keys.folded
                .entry(folded(name))
                .and_modify(|n| *n = None)
                .or_insert_with(|| Some(name.to_owned()));
            let c = camel(name);
            if c != name {
                keys.max_chars = keys.max_chars.max(c.chars().count());
                keys.camel.entry(c).or_insert_with(|| name.to_owned());
            }
            if let Some(sub) = properties.get(name)
                && let Some(inner) = Self::of_value(sub, root, depth + 1, left)
            {
                keys.nested.insert(name.to_owned(), inner);
            }
        }
        Some(keys)
    }

    /// The keys a value declares whose schema is `sub`: an object's (named by a local `$ref`,
    /// `#/$defs/...` as pydantic writes a nested model, or the one choice but `null` of an
    /// `anyOf` or `oneOf`, as it writes an optional one), or each item's of a list.
    fn of_value(sub: &Value, root: &Value, depth: usize, left: &mut usize) -> Option<Self> {
        if depth > MAX_NESTING || *left == 0 {
            return None;
        }
        let sub = sub.as_object()?;
        if let Some(target) = sub.get("$ref").and_then(Value::as_str) {
            // Only a `$ref` alone: beside other keywords it adds to what it names.
            if sub.len() != 1 {
                return None;
            }
            let path = target.strip_prefix("#/")?;
            let mut at = root;
            for token in path.split('/') {
                at = at.get(token.replace("~1", "/").replace("~0", "~"))?;
            }
            return Self::of_value(at, root, depth + 1, left);
        }
        for choice in ["anyOf", "oneOf"] {
            if let Some(choices) = sub.get(choice) {
                let mut others = choices
                    .as_array()?
                    .iter()
                    .filter(|c| c.get("type").and_then(Value::as_str) != Some("null"));
                let (Some(only), None) = (others.next(), others.next()) else {
                    return None;
                };
                return Self::of_value(only, root, depth + 1, left);
            }
        }
        if sub.get("type").and_then(Value::as_str) == Some("array") {
            return Self::of_value(sub.get("items")?, root, depth + 1, left);
        }
        *left -= 1;
        Self::of_schema(sub, root, depth, left)
    }

    /// The keys the value of the declared `name` declares in turn ([`ArgumentKeys::nested`]).
    pub fn nested(&self, name: &str) -> Option<&ArgumentKeys> {
        self.nested.get(name)
    }

    /// What a server reads `key` of a call's arguments as; `None`: a key no server reads, by
    /// this schema (dropped from the count).
    pub fn reads(&self, key: &str) -> Option<Read<'_>> {
        if let Some(name) = self.names.get(key) {
            return Some(Read::Name(name));
        }
        // Folding keeps the count of characters, and `camel` drops at most every other one: a
        // longer key is none of them (and is not copied to be compared).
        let chars = key.chars().count();
        if chars > 2 * self.max_chars {
            return None;
        }
        if chars <= self.max_chars
            && let Some(name) = self.folded.get(&folded(key))
        {
            return Some(name.as_deref().map_or(Read::Spelled, Read::Name));
        }
        if key.contains('_')
            && let Some(name) = self.names.get(&camel(key))
        {
            return Some(Read::Alias(name));
        }
        self.camel.get(key).map(|name| Read::Alias(name))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tool(schema: Value) -> Value {
        json!({"name": "t", "inputSchema": schema})
    }

    #[test]
    fn camel_case_as_pydantic_writes_it() {
        for (snake, camel_case) in [
            ("file_path", "filePath"),
            ("file_Path", "filePath"),
            ("a_1", "a1"),
            ("_x", "_x"),
            ("x_", "x_"),
            ("a__b", "a__b"),
            ("plain", "plain"),
        ] {
            assert_eq!(camel(snake), camel_case, "{snake}");
        }
    }

    #[test]
    fn only_a_closed_schema_with_properties_declares_keys() {
        let props = json!({"a": {"type": "integer"}, "b": {"type": "integer"}});
        // pydantic's (no `additionalProperties`) and zod's (`false`).
        assert!(ArgumentKeys::of(&tool(json!({"type": "object", "properties": props}))).is_some());
        assert!(
            ArgumentKeys::of(&tool(
                json!({"type": "object", "properties": props, "additionalProperties": false})
            ))
            .is_some()
        );
        for open in [
            json!({"type": "object"}),
            json!({"type": "object", "properties": props, "additionalProperties": true}),
            json!({"type": "object", "properties": props, "additionalProperties": {}}),
            json!({"type": "object", "properties": props, "patternProperties": {"^x": {}}}),
            json!({"type": "object", "properties": props, "unevaluatedProperties": true}),
            json!({"type": "object", "properties": props, "allOf": [{"properties": {"c": {}}}]}),
            json!({"type": "object", "properties": props, "$ref": "#/$defs/more"}),
            json!({"type": "object", "properties": "a"}),
            json!("not a schema"),
        ] {
            assert!(ArgumentKeys::of(&tool(open.clone())).is_none(), "{open}");
        }
        assert!(ArgumentKeys::of(&json!({"name": "t"})).is_none());
    }

    /// A model named by many of its own properties is not made a tree exponential in the
    /// depth (ten properties: 10^8 objects without the bound).
    #[test]
    fn nested_keys_are_made_for_a_bounded_number_of_objects() {
        fn objects(keys: &ArgumentKeys) -> usize {
            1 + keys.nested.values().map(objects).sum::<usize>()
        }
        let props: serde_json::Map<String, Value> = (0..10)
            .map(|i| (format!("p{i}"), json!({"$ref": "#/$defs/N"})))
            .collect();
        let keys = ArgumentKeys::of(&tool(json!({
            "$defs": {"N": {"type": "object", "properties": props}},
            "properties": {"n": {"$ref": "#/$defs/N"}},
        })))
        .unwrap();
        assert_eq!(objects(&keys), 1 + MAX_NESTED);
        assert!(keys.nested("n").unwrap().nested("p0").is_some());
    }

    #[test]
    fn keys_read_as_declared_names_are_kept() {
        let keys = ArgumentKeys::of(&tool(json!({
            "properties": {"a": {}, "sql": {}, "filePath": {}, "max_depth": {}},
            "required": ["extra"],
        })))
        .unwrap();
        assert_eq!(keys.reads("a"), Some(Read::Name("a")));
        assert_eq!(keys.reads("A"), Some(Read::Name("a")));
        assert_eq!(keys.reads("SQL"), Some(Read::Name("sql")));
        assert_eq!(keys.reads("\u{17f}ql"), Some(Read::Name("sql")));
        assert_eq!(keys.reads("FILEPATH"), Some(Read::Name("filePath")));
        assert_eq!(keys.reads("file_path"), Some(Read::Alias("filePath")));
        assert_eq!(keys.reads("maxDepth"), Some(Read::Alias("max_depth")));
        assert_eq!(keys.reads("extra"), Some(Read::Name("extra")));
        for junk in [
            "nonce1",
            "b",
            "a_",
            "_a",
            "fi_le_path",
            "file__path",
            "maxdepth",
            "",
            &"a".repeat(10_000),
        ] {
            assert_eq!(keys.reads(junk), None, "{junk}");
        }
        // Two declared names Go reads as one: another spelling of them is kept as spelled.
        let keys = ArgumentKeys::of(&tool(json!({"properties": {"s": {}, "S": {}}}))).unwrap();
        assert_eq!(keys.reads("S"), Some(Read::Name("S")));
        assert_eq!(keys.reads("\u{17f}"), Some(Read::Spelled));
    }
}
