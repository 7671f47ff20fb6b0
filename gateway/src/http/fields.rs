//! A message's header fields as received: every name in one buffer, every value in another,
//! with their places beside them. A request head costs three allocations this way, not two per
//! field, and reading a name is a slice of a `String` (no UTF-8 check per look-up).

/// Header fields in order (names as sent; compared case-insensitively by the readers).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Fields {
    names: String,
    values: Vec<u8>,
    /// Where each field's name ends in `names` and its value in `values` (each starts where the
    /// field before ends), and the name's [`key`].
    at: Vec<[u32; 3]>,
    /// For each of [`NOTED`]'s names, 1 + the index of its first field; 0 if none has it,
    /// [`SCAN`] if the index does not fit (then it is looked for as any other name).
    first: [u16; NOTED_LEN],
    /// Which of [`NOTED`]'s names more than one field has, a bit each.
    twice: u32,
    /// Whether a value has a byte that is not ASCII (else every value is UTF-8 as it is).
    not_ascii: bool,
}

/// Names every request is asked for, most of them by several stages: where each first comes,
/// and whether it comes again, is noted as the fields are added, so that asking for one
/// ([`Noted`]) is not a scan of every field, and a name asked for again and again costs
/// nothing more.
const NOTED: Names<NOTED_LEN> = Names::new([
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "content-type",
    "content-encoding",
    "accept",
    "authorization",
    "x-api-key",
    "mcp-protocol-version",
    "mcp-session-id",
    "mcp-method",
    "mcp-name",
    "last-event-id",
    "traceparent",
    "tracestate",
    "origin",
    "expect",
    "x-forwarded-for",
    "user-agent",
]);
const NOTED_LEN: usize = 20;
/// In [`Fields::first`]: the field is looked for by scanning.
const SCAN: u16 = u16::MAX;

/// Which noted name a field's name is, asked of every field of every head read: its [`key`]
/// picks the one entry of a table that may be it (no two noted names share a key, and the
/// table has a place for each key of theirs alone), and only that name is compared.
fn noted(name: &str, want: u32) -> Option<usize> {
    let i = usize::from(NOTED_TABLE.1[noted_slot(want, NOTED_TABLE.0)]).checked_sub(1)?;
    (NOTED.keys[i] == want && eq_lowercase(name.as_bytes(), NOTED.names[i].as_bytes())).then_some(i)
}

/// The table's place of a key, by a multiplier ([`NOTED_TABLE`]'s first).
const fn noted_slot(key: u32, multiplier: u64) -> usize {
    ((key as u64).wrapping_mul(multiplier) >> (64 - NOTED_SLOTS.trailing_zeros())) as usize
}

const NOTED_SLOTS: usize = 512;

/// A multiplier that gives every noted name's key a place of its own, and the table: 1 + the
/// name's index at its place, 0 elsewhere. Found when the gateway is compiled.
/// (A set that cannot be tabled fails to compile.)
const NOTED_TABLE: (u64, [u8; NOTED_SLOTS]) = {
    let mut i = 0;
    while i < NOTED_LEN {
        let mut j = i + 1;
        while j < NOTED_LEN {
            assert!(
                NOTED.keys[i] != NOTED.keys[j],
                "two noted names share a key"
            );
            j += 1;
        }
        i += 1;
    }
    let mut multiplier: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut tries = 0;
    loop {
        let mut table = [0u8; NOTED_SLOTS];
        let mut free = true;
        let mut i = 0;
        while i < NOTED_LEN {
            let slot = noted_slot(NOTED.keys[i], multiplier);
            if table[slot] != 0 {
                free = false;
                break;
            }
            table[slot] = i as u8 + 1;
            i += 1;
        }
        if free {
            break (multiplier, table);
        }
        tries += 1;
        if tries > 100_000 {
            panic!("no multiplier tables the noted names");
        }
        multiplier = multiplier.wrapping_add(0x2545_f491_4f6c_dd1d) | 1;
    }
};

/// Whether `name` is `lower` (lowercase ASCII, as long) ignoring the case of ASCII letters:
/// eight bytes at a time, each folded at once.
#[inline]
fn eq_lowercase(name: &[u8], lower: &[u8]) -> bool {
    /// `w` with every byte `A`..=`Z` made lowercase, and nothing else changed.
    const fn fold(w: u64) -> u64 {
        const ONES: u64 = 0x0101_0101_0101_0101;
        // Each byte's low seven bits, plus a bias whose sum reaches 0x80 exactly from `A` (or
        // past `Z`); no sum carries into the next byte (0x7f + 0x3f < 0x100).
        let low = w & (0x7f * ONES);
        let from_a = low + (0x80 - b'A' as u64) * ONES;
        let past_z = low + (0x80 - b'Z' as u64 - 1) * ONES;
        let upper = from_a & !past_z & !w & (0x80 * ONES);
        w | (upper >> 2)
    }
    // The last few bytes as one word, by shifts (a copy into a buffer is a call to memcpy).
    let rest = |b: &[u8]| b.iter().rev().fold(0u64, |w, &x| (w << 8) | u64::from(x));
    if name.len() != lower.len() {
        return false;
    }
    let (names, name_rest) = name.as_chunks::<8>();
    let (lowers, lower_rest) = lower.as_chunks::<8>();
    names
        .iter()
        .zip(lowers)
        .all(|(a, b)| fold(u64::from_le_bytes(*a)) == u64::from_le_bytes(*b))
        && fold(rest(name_rest)) == rest(lower_rest)
}

/// One of [`NOTED`]'s names, found without a scan ([`FieldName`]). The constants of [`name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Noted(usize);

impl Noted {
    /// The noted name `text` (lowercase); a name that is not one fails to compile where it is
    /// asked for in a constant.
    #[expect(
        clippy::panic,
        reason = "asked for in constants: a wrong name fails to compile"
    )]
    pub const fn of(text: &str) -> Self {
        let mut i = 0;
        while i < NOTED_LEN {
            if NOTED.names[i]
                .as_bytes()
                .eq_ignore_ascii_case(text.as_bytes())
            {
                return Self(i);
            }
            i += 1;
        }
        panic!("not a noted name");
    }

    /// Every noted name.
    pub fn all() -> impl Iterator<Item = Self> {
        (0..NOTED_LEN).map(Self)
    }
}

/// The names every request is asked for, as [`Noted`] (compared ignoring case, as any name).
pub mod name {
    use super::Noted;
    pub const HOST: Noted = Noted::of("host");
    pub const CONTENT_LENGTH: Noted = Noted::of("content-length");
    pub const TRANSFER_ENCODING: Noted = Noted::of("transfer-encoding");
    pub const CONNECTION: Noted = Noted::of("connection");
    pub const CONTENT_TYPE: Noted = Noted::of("content-type");
    pub const CONTENT_ENCODING: Noted = Noted::of("content-encoding");
    pub const ACCEPT: Noted = Noted::of("accept");
    pub const AUTHORIZATION: Noted = Noted::of("authorization");
    pub const X_API_KEY: Noted = Noted::of("x-api-key");
    pub const MCP_PROTOCOL_VERSION: Noted = Noted::of("mcp-protocol-version");
    pub const MCP_SESSION_ID: Noted = Noted::of("mcp-session-id");
    pub const MCP_METHOD: Noted = Noted::of("mcp-method");
    pub const MCP_NAME: Noted = Noted::of("mcp-name");
    pub const LAST_EVENT_ID: Noted = Noted::of("last-event-id");
    pub const TRACEPARENT: Noted = Noted::of("traceparent");
    pub const TRACESTATE: Noted = Noted::of("tracestate");
    pub const ORIGIN: Noted = Noted::of("origin");
    pub const EXPECT: Noted = Noted::of("expect");
    pub const X_FORWARDED_FOR: Noted = Noted::of("x-forwarded-for");
    pub const USER_AGENT: Noted = Noted::of("user-agent");
}

/// Where the fields of a name are, as far as [`Fields`] knows without looking.
pub enum Span {
    /// No field has it.
    None,
    /// The first is field `first`; `more`: others follow it.
    At { first: usize, more: bool },
    /// Anywhere: every field is looked at.
    Scan,
}

/// A name to look fields up by: any text, or one of [`NOTED`]'s ([`Noted`]), found at once.
pub trait FieldName<'n>: Copy {
    fn text(self) -> &'n str;
    fn span(self, _fields: &Fields) -> Span {
        Span::Scan
    }
}

impl<'n> FieldName<'n> for &'n str {
    #[inline]
    fn text(self) -> &'n str {
        self
    }
}

impl FieldName<'static> for Noted {
    #[inline]
    fn text(self) -> &'static str {
        NOTED.names[self.0]
    }

    #[inline]
    fn span(self, fields: &Fields) -> Span {
        match fields.first[self.0] {
            0 => Span::None,
            SCAN => Span::Scan,
            i => Span::At {
                first: usize::from(i) - 1,
                more: fields.repeated(self),
            },
        }
    }
}

/// A name's length and its first and last bytes, lowercased: equal for names equal but for
/// case, and for few others. A look-up compares this first, so that it skips a field of
/// another name in one comparison.
#[inline]
const fn key(name: &[u8]) -> u32 {
    match name {
        [] => 0,
        [first, .., last] | [first @ last] => {
            (name.len() as u32 & 0xffff)
                | (first.to_ascii_lowercase() as u32) << 16
                | (last.to_ascii_lowercase() as u32) << 24
        }
    }
}

/// A set of field names, compared ignoring case. Asked of every field of every message a few
/// times: the name's [`key`] is compared with every entry's at once (a comparison the compiler
/// makes on whole vectors), and only a name whose key is among them is compared as text.
pub struct Names<const N: usize> {
    names: [&'static str; N],
    keys: [u32; N],
}

impl<const N: usize> Names<N> {
    pub const fn new(names: [&'static str; N]) -> Self {
        let mut keys = [0; N];
        let mut i = 0;
        while i < N {
            let name = names[i].as_bytes();
            let mut j = 0;
            while j < name.len() {
                assert!(!name[j].is_ascii_uppercase(), "a set of names is lowercase");
                j += 1;
            }
            keys[i] = key(name);
            i += 1;
        }
        Self { names, keys }
    }

    #[inline]
    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// Which entry `name` is: only entries of its key are compared as text.
    #[inline]
    fn position(&self, name: &str) -> Option<usize> {
        let want = key(name.as_bytes());
        // Without an early exit, so that the comparisons are vectorized.
        if !self.keys.iter().fold(false, |hit, k| hit | (*k == want)) {
            return None;
        }
        let mut from = 0;
        while let Some(i) = self.keys[from..].iter().position(|k| *k == want) {
            if self.is(from + i, name) {
                return Some(from + i);
            }
            from += i + 1;
        }
        None
    }

    /// Whether entry `i` is `name`. The entries are lowercase (`new` sees to it), so only
    /// `name` is folded ([`eq_lowercase`]).
    #[inline]
    fn is(&self, i: usize, name: &str) -> bool {
        eq_lowercase(name.as_bytes(), self.names[i].as_bytes())
    }
}

impl Fields {
    /// Room for `fields` fields whose names take `names` bytes and values `values`.
    pub fn with_capacity(fields: usize, names: usize, values: usize) -> Self {
        Self {
            names: String::with_capacity(names),
            values: Vec::with_capacity(values),
            at: Vec::with_capacity(fields),
            ..Self::default()
        }
    }

    /// The fields httparse found, copied.
    pub fn from_parsed(parsed: &[httparse::Header<'_>]) -> Self {
        let names = parsed.iter().map(|h| h.name.len()).sum();
        let values = parsed.iter().map(|h| h.value.len()).sum();
        let mut fields = Self::with_capacity(parsed.len(), names, values);
        for h in parsed {
            fields.push(h.name, h.value);
        }
        fields
    }

    /// Adds a field at the end. Buffers are bounded by the head limits of whoever reads one (1
    /// MiB at most for a request, 64 KiB for an answer), far below 4 GiB; a field that would not
    /// fit is not added (never reached: nothing is checked before all its fields are in).
    pub fn push(&mut self, name: &str, value: &[u8]) {
        let (Ok(n), Ok(v)) = (
            u32::try_from(self.names.len() + name.len()),
            u32::try_from(self.values.len() + value.len()),
        ) else {
            return;
        };
        self.names.push_str(name);
        self.values.extend_from_slice(value);
        self.not_ascii |= !value.is_ascii();
        let key = key(name.as_bytes());
        self.at.push([n, v, key]);
        if let Some(k) = noted(name, key) {
            match self.first[k] {
                0 => self.first[k] = u16::try_from(self.at.len()).unwrap_or(SCAN),
                _ => self.twice |= 1 << k,
            }
        }
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Each field as (name, value), in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            fields: self,
            front: 0,
            back: self.at.len(),
        }
    }

    /// Field `i` (`i < self.len()`).
    #[inline]
    fn field(&self, i: usize) -> (&str, &[u8]) {
        let [n0, v0, _] = match i.checked_sub(1) {
            Some(p) => self.at[p],
            None => [0, 0, 0],
        };
        let [n1, v1, _] = self.at[i];
        (
            &self.names[n0 as usize..n1 as usize],
            &self.values[v0 as usize..v1 as usize],
        )
    }

    /// The first value of field `name` (case-insensitive). The look-up of every request's
    /// every stage: one loop over the keys, without the adapters of [`Fields::all`], or none
    /// for a [`Noted`] name.
    pub fn get<'n>(&self, name: impl FieldName<'n>) -> Option<&[u8]> {
        let from = match name.span(self) {
            Span::None => return None,
            Span::At { first, .. } => return Some(self.field(first).1),
            Span::Scan => 0,
        };
        let text = name.text();
        let want = key(text.as_bytes());
        for (i, at) in self.at[from..].iter().enumerate() {
            if at[2] == want {
                let (n, v) = self.field(from + i);
                if n.eq_ignore_ascii_case(text) {
                    return Some(v);
                }
            }
        }
        None
    }

    /// Whether more than one field is named `name`.
    pub fn repeated(&self, name: Noted) -> bool {
        self.twice & (1 << name.0) != 0
    }

    /// The first value of field `name` (case-insensitive) if it is UTF-8. Without a look at
    /// its bytes when every value is ASCII (most heads).
    pub fn get_str<'n>(&self, name: impl FieldName<'n>) -> Option<&str> {
        let v = self.get(name)?;
        if self.not_ascii {
            std::str::from_utf8(v).ok()
        } else {
            // SAFETY: every byte of every value is ASCII (`push` saw each), so `v` is UTF-8.
            Some(unsafe { std::str::from_utf8_unchecked(v) })
        }
    }

    /// Every value of field `name` (case-insensitive), in order. Looked up a few dozen times
    /// for each request: keys are compared first, and only a field whose key is the name's is
    /// sliced and compared; a [`Noted`] name's fields are looked for only from its first, and
    /// not past it when it is the only one.
    pub fn all<'a, 'n, N: FieldName<'n>>(
        &'a self,
        name: N,
    ) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n, N> {
        let (from, most) = match name.span(self) {
            Span::None => (self.at.len(), 0),
            Span::At { first, more } => (first, if more { usize::MAX } else { 1 }),
            Span::Scan => (0, usize::MAX),
        };
        let text = name.text();
        let want = key(text.as_bytes());
        self.at[from..]
            .iter()
            .enumerate()
            .filter(move |(_, at)| at[2] == want)
            .filter_map(move |(i, _)| {
                let (n, v) = self.field(from + i);
                n.eq_ignore_ascii_case(text).then_some(v)
            })
            .take(most)
    }

    /// The value of every field named `a` or `b` (case-insensitive), in order, with whether it
    /// is `b`: one loop over the keys for both names.
    pub fn either<'a>(
        &'a self,
        a: &'a str,
        b: &'a str,
    ) -> impl Iterator<Item = (bool, &'a [u8])> + use<'a> {
        let (ka, kb) = (key(a.as_bytes()), key(b.as_bytes()));
        self.at
            .iter()
            .enumerate()
            .filter(move |(_, at)| at[2] == ka || at[2] == kb)
            .filter_map(move |(i, _)| {
                let (n, v) = self.field(i);
                if n.eq_ignore_ascii_case(a) {
                    Some((false, v))
                } else {
                    n.eq_ignore_ascii_case(b).then_some((true, v))
                }
            })
    }

    /// Replaces the value of every field named `name` (case-insensitive) by what `f` makes of
    /// it.
    pub fn replace_values(&mut self, name: &str, mut f: impl FnMut(&[u8]) -> Vec<u8>) {
        if self.get(name).is_none() {
            return;
        }
        let mut out = Self::with_capacity(self.len(), self.names.len(), self.values.len());
        for (n, v) in self.iter() {
            if n.eq_ignore_ascii_case(name) {
                out.push(n, &f(v));
            } else {
                out.push(n, v);
            }
        }
        *self = out;
    }

    /// Keeps the fields `keep` says yes to (asked once for each, in order).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &[u8]) -> bool) {
        let Some(first) = self.iter().position(|(n, v)| !keep(n, v)) else {
            return;
        };
        let mut out = Self::with_capacity(self.len(), self.names.len(), self.values.len());
        for (n, v) in self.iter().take(first) {
            out.push(n, v);
        }
        for (n, v) in self.iter().skip(first + 1) {
            if keep(n, v) {
                out.push(n, v);
            }
        }
        *self = out;
    }
}

/// The fields of [`Fields`] as (name, value), in order.
#[derive(Clone)]
pub struct Iter<'a> {
    fields: &'a Fields,
    /// The fields `front..back` are still to come.
    front: usize,
    back: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.front == self.back {
            return None;
        }
        self.front += 1;
        Some(self.fields.field(self.front - 1))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.back - self.front, Some(self.back - self.front))
    }

    /// Skips without slicing the fields skipped (`skip` asks for this).
    fn nth(&mut self, n: usize) -> Option<Self::Item> {
        self.front = self.front.saturating_add(n).min(self.back);
        self.next()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front == self.back {
            return None;
        }
        self.back -= 1;
        Some(self.fields.field(self.back))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a Fields {
    type Item = (&'a str, &'a [u8]);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> FromIterator<(N, V)> for Fields {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(fields: I) -> Self {
        let mut out = Self::default();
        for (n, v) in fields {
            out.push(n.as_ref(), v.as_ref());
        }
        out
    }
}

/// Fields whose values are credentials: `Debug` leaves them out.
const SECRET: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
    "set-cookie",
    "mcp-session-id",
];

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(n, v)| {
                let v = if SECRET.iter().any(|s| n.eq_ignore_ascii_case(s)) {
                    "<redacted>".into()
                } else {
                    String::from_utf8_lossy(v)
                };
                (n, v)
            }))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::{Fields, Names};

    #[test]
    fn names_are_found_whatever_their_case_and_only_they() {
        const SET: Names<4> = Names::new(["host", "x-api-key", "te", "transfer-encoding"]);
        for yes in [
            "host",
            "HOST",
            "Host",
            "X-Api-Key",
            "te",
            "TE",
            "Transfer-Encoding",
        ] {
            assert!(SET.contains(yes), "{yes}");
        }
        // Same length, first and last letters as an entry (the same key), or a prefix of one.
        for no in [
            "hast",
            "x-apx-key",
            "tE ",
            "t",
            "",
            "hosts",
            "transfer-encodinG2",
            "ho",
        ] {
            assert!(!SET.contains(no), "{no}");
        }
    }

    /// A noted name's fields, found without a scan, are the fields a scan finds, whatever
    /// the names' case, their repeats, and however many fields come before.
    #[test]
    fn noted_names_are_found_as_a_scan_finds_them() {
        use super::{FieldName, Noted};
        let check = |f: &Fields| {
            for n in Noted::all() {
                let text = n.text();
                let upper = text.to_ascii_uppercase();
                assert_eq!(f.get(n), f.get(text), "{text}");
                assert_eq!(f.get(n), f.get(upper.as_str()), "{text}");
                assert_eq!(
                    f.all(n).collect::<Vec<_>>(),
                    f.all(text).collect::<Vec<_>>(),
                    "{text}"
                );
                assert_eq!(f.repeated(n), f.all(text).count() > 1, "{text}");
                assert_eq!(
                    f.get_str(n),
                    f.get(text).and_then(|v| std::str::from_utf8(v).ok()),
                    "{text}"
                );
            }
        };
        let mut f: Fields = [
            ("Host", "gw"),
            ("x-other", "1"),
            ("MCP-Session-Id", "s1"),
            ("content-TYPE", "application/json"),
            ("mcp-session-id", "s2"),
            ("Mcp-Protocol-Versio", "not it"),
            ("cONNECTION", "close"),
        ]
        .into_iter()
        .collect();
        check(&f);
        assert!(f.repeated(Noted::of("mcp-session-id")));
        assert!(!f.repeated(Noted::of("host")));
        f.push("x-raw", &[0xff]);
        f.push("accept", &[0xc3, 0xa9]);
        f.push("user-agent", &[0xff]);
        check(&f);
        assert_eq!(f.get_str(Noted::of("accept")), Some("\u{e9}"));
        assert_eq!(f.get_str(Noted::of("user-agent")), None, "not UTF-8");
        f.retain(|n, _| !n.eq_ignore_ascii_case("mcp-session-id"));
        check(&f);
        f.replace_values("host", |_| b"other".to_vec());
        check(&f);
        // Past the fields whose place fits in the index: found by a scan.
        let mut many = Fields::default();
        for _ in 0..70_000 {
            many.push("x", b"");
        }
        many.push("Host", b"late");
        many.push("host", b"later");
        many.push("traceparent", b"t");
        assert_eq!(many.get(Noted::of("host")), Some(&b"late"[..]));
        assert!(many.repeated(Noted::of("host")));
        check(&many);
    }

    /// The folding comparison agrees with the standard one for every byte in every place.
    #[test]
    fn names_are_compared_ignoring_ascii_case_only() {
        use super::eq_lowercase;
        let lower = "mcp-protocol-version";
        for len in 0..=lower.len() {
            let entry = &lower.as_bytes()[..len];
            assert!(eq_lowercase(entry, entry));
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut name = entry.to_vec();
                    name[at] = b;
                    assert_eq!(
                        eq_lowercase(&name, entry),
                        name.eq_ignore_ascii_case(entry),
                        "{name:?}"
                    );
                }
            }
        }
        assert!(!eq_lowercase(b"host", b"hosts"));
        assert!(eq_lowercase(b"MCP-PROTOCOL-VERSION", lower.as_bytes()));
        assert!(!eq_lowercase(
            b"mcp-protocol-versioN\x80",
            b"mcp-protocol-versionn"
        ));
    }

    #[test]
    fn fields_keep_their_order_names_and_bytes() {
        let mut f: Fields = [("Host", "gw"), ("X-A", "1"), ("x-a", "2")]
            .into_iter()
            .collect();
        f.push("x-raw", &[0xff, b'\t', 0x80]);
        assert_eq!(f.len(), 4);
        assert_eq!(f.get("host"), Some(&b"gw"[..]));
        assert_eq!(f.get("X-A"), Some(&b"1"[..]), "the first of two");
        assert_eq!(f.get("x-raw"), Some(&[0xff, b'\t', 0x80][..]));
        assert_eq!(f.get("x-b"), None);
        assert_eq!(f.all("x-a").collect::<Vec<_>>(), [&b"1"[..], &b"2"[..]]);
        assert_eq!(f.all("x").count(), 0);
        assert_eq!(f.all("x-A").count(), 2);
        assert_eq!(
            f.either("x-b", "HOSS").count(),
            0,
            "names of the keys of x-a and host"
        );
        assert_eq!(
            f.either("X-A", "HOST").collect::<Vec<_>>(),
            [(true, &b"gw"[..]), (false, &b"1"[..]), (false, &b"2"[..])],
            "in order, each with which name it is"
        );
        assert_eq!(
            f.get("X-RBW"),
            None,
            "a name of the same key as x-raw, not the same name"
        );
        assert_eq!(f.get(""), None);
        let all: Vec<(&str, &[u8])> = f.iter().collect();
        assert_eq!(all[1], ("X-A", &b"1"[..]));
        assert_eq!(f.iter().next_back().map(|(n, _)| n), Some("x-raw"));
        assert_eq!(f.iter().nth(2).map(|(_, v)| v), Some(&b"2"[..]));
        assert_eq!(f.iter().skip(3).count(), 1);
        assert_eq!(f.iter().nth(4), None);
        assert_eq!(f.iter().skip(9).next_back(), None);
        assert_eq!(format!("{f:?}").matches("x-a").count(), 1);

        f.retain(|n, v| !(n.eq_ignore_ascii_case("x-a") && v == b"1"));
        assert_eq!(f.get("x-a"), Some(&b"2"[..]));
        f.push("empty", b"");
        assert_eq!(f.get("empty"), Some(&b""[..]));

        let mut asked = 0;
        f.retain(|_, _| {
            asked += 1;
            true
        });
        assert_eq!(asked, 4, "once each");
        f.replace_values("HOST", |v| [v, b"!"].concat());
        assert_eq!(f.get("host"), Some(&b"gw!"[..]));
        let names: Vec<&str> = f.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["Host", "x-a", "x-raw", "empty"], "order kept");
        assert_eq!(f, f.clone());
        assert!(Fields::default().is_empty());
        let secret: Fields = [("Authorization", "Bearer s3cret"), ("x-api-key", "k3y")]
            .into_iter()
            .collect();
        let shown = format!("{secret:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("k3y"),
            "{shown}"
        );
    }
}
