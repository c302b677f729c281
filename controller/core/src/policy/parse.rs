//! Parsing and whole-document validation of policy YAML.
//!
//! The YAML is first read into a generic tree (so one bad field does not
//! hide the next), then walked field by field, collecting every error with
//! the file, the resource and the field path it is about. Any error and no
//! policy is returned.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};

use crate::policy::Policy;
use crate::policy::model::{PortRange, PortRule, Protocol, Rule, Selector};

/// Largest policy file accepted, in bytes (1 MiB).
pub const MAX_INPUT_BYTES: usize = 1 << 20;
/// Most rules (ingress plus deny, over all documents) one file may hold.
pub const MAX_RULES: usize = 10_000;
/// The `apiVersion` of policy resources.
pub const API_VERSION: &str = "weft.dev/v1";
/// The `kind` of policy resources.
pub const KIND: &str = "NetworkPolicy";

/// Parses and validates every document of a multi-document YAML file.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Policy>, PolicyErrors> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(PolicyErrors(vec![PolicyError {
            file: file.to_owned(),
            resource: String::new(),
            field: String::new(),
            message: format!(
                "file is {} bytes; the limit is {MAX_INPUT_BYTES} bytes (1 MiB): split it",
                text.len()
            ),
        }]));
    }
    parse_text(file, text)
}

/// [`parse_documents`] without the file-size limit, for text Weft wrote
/// itself (a stored policy's canonical YAML can be longer than the file it
/// came from).
pub(crate) fn parse_text(file: &str, text: &str) -> Result<Vec<Policy>, PolicyErrors> {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    let documents: Vec<Value> = match serde_saphyr::from_multiple_with_options(text, options) {
        Ok(docs) => docs,
        Err(e) => {
            return Err(PolicyErrors(vec![PolicyError {
                file: file.to_owned(),
                resource: String::new(),
                field: String::new(),
                message: format!("invalid YAML: {e}"),
            }]));
        }
    };

    let mut errors = Vec::new();
    let mut policies = Vec::new();
    // Name -> 1-based document number, to point duplicates at each other.
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut rules = 0usize;
    for (i, doc) in documents.iter().enumerate() {
        let number = i + 1;
        if doc.is_null() {
            continue; // An empty document (e.g. a trailing `---`).
        }
        let mut walker = Walker {
            file,
            resource: resource_name(doc, number),
            errors: &mut errors,
        };
        // Duplicates are reported even when the documents have other errors.
        let name = doc
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str);
        if let Some(name) = name {
            let first = *names.entry(name.to_owned()).or_insert(number);
            if first != number {
                walker.error(
                    "metadata.name",
                    format!("duplicate name: document {first} already defines it"),
                );
            }
        }
        // Counted before validation, so a huge bad file is refused for its
        // size rather than described rule by rule.
        rules += ["ingress", "deny"]
            .iter()
            .filter_map(|k| doc.get("spec")?.get(k)?.as_array().map(Vec::len))
            .sum::<usize>();
        if let Some(policy) = walker.policy(doc) {
            policies.push(policy);
        }
    }
    if rules > MAX_RULES {
        // Per-rule errors of an oversized file would only bury this one.
        errors.clear();
        errors.push(PolicyError {
            file: file.to_owned(),
            resource: String::new(),
            field: String::new(),
            message: format!("file has {rules} rules; the limit is {MAX_RULES} rules: split it"),
        });
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(PolicyErrors(errors))
    }
}

/// One thing wrong with a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file, as the caller named it.
    pub file: String,
    /// `NetworkPolicy "web"`, or `document 3` when it has no usable name;
    /// empty when the error is about the whole file.
    pub resource: String,
    /// Path of the field, e.g. `spec.ingress[0].ports[1].port`; empty when
    /// the error is about the whole resource or file.
    pub field: String,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file)?;
        if !self.resource.is_empty() {
            write!(f, "{}: ", self.resource)?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

/// Every error found in a policy file (never empty); nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// How the resource is named in errors, from whatever of it is readable.
fn resource_name(doc: &Value, number: usize) -> String {
    let kind = doc.get("kind").and_then(Value::as_str);
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    match (kind, name) {
        (Some(kind), Some(name)) => format!("{kind} {name:?}"),
        (None, Some(name)) => format!("{KIND} {name:?}"),
        (Some(_) | None, None) => format!("document {number}"),
    }
}

struct Walker<'a> {
    file: &'a str,
    resource: String,
    errors: &'a mut Vec<PolicyError>,
}

impl Walker<'_> {
    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            resource: self.resource.clone(),
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// The mapping at `path`, with unknown keys reported.
    fn object<'v>(
        &mut self,
        path: &str,
        value: &'v Value,
        known: &[&str],
    ) -> Option<&'v Map<String, Value>> {
        let Some(map) = value.as_object() else {
            self.error(path, format!("expected a mapping, got {}", describe(value)));
            return None;
        };
        for key in map.keys() {
            if !known.contains(&key.as_str()) {
                self.error(
                    &join(path, key),
                    format!("unknown field; expected one of: {}", known.join(", ")),
                );
            }
        }
        Some(map)
    }

    fn string<'v>(&mut self, path: &str, value: Option<&'v Value>) -> Option<&'v str> {
        match value {
            None => {
                self.error(path, "missing");
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.error(path, format!("expected a string, got {}", describe(other)));
                None
            }
        }
    }

    fn policy(&mut self, doc: &Value) -> Option<Policy> {
        let map = self.object("", doc, &["apiVersion", "kind", "metadata", "spec"])?;
        if let Some(v) = self.string("apiVersion", map.get("apiVersion"))
            && v != API_VERSION
        {
            self.error(
                "apiVersion",
                format!("{v:?} is not supported; use {API_VERSION}"),
            );
        }
        if let Some(k) = self.string("kind", map.get("kind"))
            && k != KIND
        {
            self.error("kind", format!("{k:?} is not a policy kind; use {KIND}"));
        }
        let name = match map.get("metadata") {
            None => {
                self.error("metadata", "missing");
                None
            }
            Some(m) => self
                .object("metadata", m, &["name"])
                .and_then(|m| self.string("metadata.name", m.get("name")))
                .and_then(|n| {
                    if is_dns_label(n) {
                        Some(n.to_owned())
                    } else {
                        self.error(
                            "metadata.name",
                            format!("{n:?} is not a DNS label: use 1 to 63 characters from a-z, 0-9 and '-', not starting or ending with '-'"),
                        );
                        None
                    }
                }),
        };
        let spec = match map.get("spec") {
            None => {
                self.error("spec", "missing");
                None
            }
            Some(s) => self.spec(s),
        };
        let (target, ingress, deny) = spec?;
        Some(Policy {
            name: name?,
            target,
            ingress,
            deny,
        })
    }

    fn spec(&mut self, value: &Value) -> Option<(Selector, Vec<Rule>, Vec<Rule>)> {
        let map = self.object("spec", value, &["target", "ingress", "deny"])?;
        let target = match map.get("target") {
            None => {
                self.error(
                    "spec.target",
                    "missing: a policy must select what it governs",
                );
                None
            }
            Some(t) => self.selector(
                "spec.target",
                t,
                "an empty target would govern every endpoint; select by matchLabels or sites",
            ),
        };
        let ingress = self.rules("spec.ingress", map.get("ingress"));
        let deny = self.rules("spec.deny", map.get("deny"));
        Some((target?, ingress?, deny?))
    }

    fn rules(&mut self, path: &str, value: Option<&Value>) -> Option<Vec<Rule>> {
        let Some(value) = value else {
            return Some(Vec::new());
        };
        let Some(items) = value.as_array() else {
            self.error(
                path,
                format!("expected a list of rules, got {}", describe(value)),
            );
            return None;
        };
        let mut ok = true;
        let mut rules = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match self.rule(&format!("{path}[{i}]"), item) {
                Some(rule) => rules.push(rule),
                None => ok = false,
            }
        }
        ok.then_some(rules)
    }

    fn rule(&mut self, path: &str, value: &Value) -> Option<Rule> {
        let map = self.object(path, value, &["from", "ports"])?;
        let from = match map.get("from") {
            None => Some(None),
            Some(f) => self
                .selector(
                    &join(path, "from"),
                    f,
                    "an empty selector is ambiguous; omit `from` to match any source",
                )
                .map(Some),
        };
        let ports = match map.get("ports") {
            None => Some(None),
            Some(p) => self.port_rules(&join(path, "ports"), p).map(Some),
        };
        Some(Rule {
            from: from?,
            ports: ports?,
        })
    }

    fn port_rules(&mut self, path: &str, value: &Value) -> Option<Vec<PortRule>> {
        let Some(items) = value.as_array() else {
            self.error(path, format!("expected a list, got {}", describe(value)));
            return None;
        };
        if items.is_empty() {
            self.error(
                path,
                "an empty list matches no traffic; omit `ports` to match all",
            );
            return None;
        }
        let mut ok = true;
        let mut rules = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match self.port_rule(&format!("{path}[{i}]"), item) {
                Some(r) => rules.push(r),
                None => ok = false,
            }
        }
        ok.then_some(rules)
    }

    fn port_rule(&mut self, path: &str, value: &Value) -> Option<PortRule> {
        let map = self.object(path, value, &["protocol", "port", "portRange"])?;
        let proto_path = join(path, "protocol");
        let protocol = match self.string(&proto_path, map.get("protocol"))? {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "ICMP" => Protocol::Icmp,
            other => {
                self.error(
                    &proto_path,
                    format!("{other:?} is not a protocol; use TCP, UDP or ICMP"),
                );
                return None;
            }
        };
        let port = map.get("port");
        let range = map.get("portRange");
        if !protocol.has_ports() && (port.is_some() || range.is_some()) {
            let field = if port.is_some() { "port" } else { "portRange" };
            self.error(&join(path, field), "ICMP has no ports; remove it");
            return None;
        }
        let ports = match (port, range) {
            (None, None) => PortRange::ALL,
            (Some(_), Some(_)) => {
                self.error(&join(path, "portRange"), "give port or portRange, not both");
                return None;
            }
            (Some(p), None) => PortRange::single(self.port(&join(path, "port"), p)?),
            (None, Some(r)) => self.port_range(&join(path, "portRange"), r)?,
        };
        Some(PortRule { protocol, ports })
    }

    fn port(&mut self, path: &str, value: &Value) -> Option<u16> {
        match value.as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p != 0 => Some(p),
            Some(_) | None => {
                self.error(path, format!("{value} is not a port (1 to 65535)"));
                None
            }
        }
    }

    fn port_range(&mut self, path: &str, value: &Value) -> Option<PortRange> {
        let text = self.string(path, Some(value))?;
        let parsed = text.split_once('-').and_then(|(a, b)| {
            let a = a.trim().parse::<u16>().ok().filter(|p| *p != 0)?;
            let b = b.trim().parse::<u16>().ok().filter(|p| *p != 0)?;
            Some((a, b))
        });
        match parsed {
            None => {
                self.error(
                    path,
                    format!("{text:?} is not a port range; write FIRST-LAST, e.g. \"8000-8100\", with ports 1 to 65535"),
                );
                None
            }
            Some((first, last)) if first > last => {
                self.error(
                    path,
                    format!("{text:?} is reversed (first port above last); did you mean \"{last}-{first}\"?"),
                );
                None
            }
            Some((first, last)) => Some(PortRange { first, last }),
        }
    }

    fn selector(&mut self, path: &str, value: &Value, if_empty: &str) -> Option<Selector> {
        let map = self.object(path, value, &["matchLabels", "sites"])?;
        let mut ok = true;
        let mut selector = Selector::default();
        if let Some(labels) = map.get("matchLabels") {
            let labels_path = join(path, "matchLabels");
            match labels.as_object() {
                Some(labels_map) => {
                    for (k, v) in labels_map {
                        let field = join(&labels_path, k);
                        if !is_label_key(k) {
                            self.error(&field, format!("{k:?} is not a label key: use up to 253 characters from A-Z, a-z, 0-9, '.', '_', '-', '/', starting and ending with a letter or digit"));
                            ok = false;
                        }
                        match v.as_str() {
                            Some(v) if is_label_value(v) => {
                                selector.match_labels.insert(k.clone(), v.to_owned());
                            }
                            Some(v) => {
                                self.error(&field, format!("{v:?} is not a label value: use up to 63 characters from A-Z, a-z, 0-9, '.', '_', '-'"));
                                ok = false;
                            }
                            None => {
                                self.error(
                                    &field,
                                    format!(
                                        "expected a string label value, got {}; quote it",
                                        describe(v)
                                    ),
                                );
                                ok = false;
                            }
                        }
                    }
                    if labels_map.is_empty() {
                        self.error(&labels_path, "empty; omit it or name at least one label");
                        ok = false;
                    }
                }
                None => {
                    self.error(
                        &labels_path,
                        format!("expected a mapping of labels, got {}", describe(labels)),
                    );
                    ok = false;
                }
            }
        }
        if let Some(sites) = map.get("sites") {
            let sites_path = join(path, "sites");
            match sites.as_array() {
                Some(items) if items.is_empty() => {
                    self.error(
                        &sites_path,
                        "an empty list selects no site; omit it to mean any site",
                    );
                    ok = false;
                }
                Some(items) => {
                    let mut seen = BTreeSet::new();
                    for (i, item) in items.iter().enumerate() {
                        let field = format!("{sites_path}[{i}]");
                        match item.as_str() {
                            Some(s) if is_dns_label(s) => {
                                if !seen.insert(s.to_owned()) {
                                    self.error(&field, format!("site {s:?} is listed twice"));
                                    ok = false;
                                }
                            }
                            Some(s) => {
                                self.error(
                                    &field,
                                    format!("{s:?} is not a site name (a DNS label)"),
                                );
                                ok = false;
                            }
                            None => {
                                self.error(
                                    &field,
                                    format!("expected a site name, got {}", describe(item)),
                                );
                                ok = false;
                            }
                        }
                    }
                    selector.sites = seen;
                }
                None => {
                    self.error(
                        &sites_path,
                        format!("expected a list of site names, got {}", describe(sites)),
                    );
                    ok = false;
                }
            }
        }
        if map.is_empty() {
            self.error(path, if_empty);
            ok = false;
        }
        ok.then_some(selector)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".to_owned(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
    }
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a valid label key (also for node and peer labels).
pub fn is_label_key(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/'))
        && s.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Whether `s` is a valid label value (also for node and peer labels).
pub fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}
