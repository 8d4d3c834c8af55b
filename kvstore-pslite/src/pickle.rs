//! MXNet's optimizer on the wire, read without running it.
//!
//! MXNet 1.9.1's `kv.set_optimizer` sends the servers its Python optimizer as a pickle of
//! protocol 0 (`kController`), which MXNet's server unpickles: any code a pickle names runs
//! there. This module reads such a pickle as **data**: a small stack machine over protocol 0's
//! opcodes that builds values and never imports or calls anything. It knows two forms of
//! call, both kept as data: the one every pickled object makes,
//! `copy_reg._reconstructor(cls, object, None)`, which it turns into "an object of class
//! `cls`" whose attributes the `BUILD` that follows gives; and `functools.partial(cls)` given
//! keyword arguments by its `BUILD` and then called with none, which it turns into "a call of
//! `cls` with these keyword arguments". A class is a pair of names, compared with a list
//! ([`optimizer_spec`] accepts MXNet's optimizers and learning-rate schedulers). Any other
//! call, opcode or class is an error naming it, and so is a pickle that would unfold to more
//! than 100,000 values or 16 MiB of text.
//!
//! [`optimizer_spec`] then turns the optimizer's attributes into an [`OptimizerSpec`] for
//! `kvstore-optimizer`, which rebuilds the optimizer by name: the same arithmetic as MXNet's,
//! chosen from a registry, with no code from the network.
//!
//! The other way, [`mxnet_optimizer_pickle`] writes the pickle a worker of this crate sends:
//! `functools.partial(mxnet.optimizer.optimizer.SGD, learning_rate=0.1, ...)()`, so that
//! MXNet's server builds the optimizer with its own constructor. The reader takes that form
//! too (a call of a `partial` of a class, with keyword arguments only), as the optimizer's
//! name and hyper-parameters.

use std::collections::{BTreeMap, HashMap};

use kvstore_base::{OptimizerSpec, ParamValue};

/// The module of MXNet's learning-rate schedulers.
const SCHEDULER_MODULE: &str = "mxnet.lr_scheduler";

/// How deep values may nest (MXNet's optimizers nest three levels).
const MAX_DEPTH: usize = 32;

/// How many values a pickle may unfold to (a value the memo shares counts each time it
/// appears): MXNet's optimizers unfold to a few dozen, and a pickle that shares values to
/// unfold to billions is refused.
const MAX_VALUES: usize = 100_000;

/// How many bytes of text (strings, names) a pickle may unfold to, shared text counted each
/// time it appears: MXNet's optimizers unfold to a few KiB.
const MAX_TEXT_BYTES: usize = 16 << 20;

/// The longest line an opcode may take (a string, a number, a name).
const MAX_LINE: usize = 64 << 10;

/// How many values a pickle may make (each opcode at most one).
const MAX_NODES: usize = 1 << 20;

/// How many references a pickle may hold at once, on the stack, in lists and dicts and in the
/// memo together (each costs memory but no value: a mark, a duplicate, an item appended).
const MAX_REFERENCES: usize = 4 << 20;

/// One value of the pickle, in the arena of [`Machine`].
#[derive(Debug, Clone)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    /// A name the pickle refers to (`GLOBAL`): never imported.
    Global(String, String),
    /// An object of a class, with the attributes its `BUILD` gave (a dict), if any.
    Object {
        module: String,
        class: String,
        state: Option<usize>,
    },
    /// `functools.partial(module.class)`, with the keyword arguments its `BUILD` gave.
    Partial {
        module: String,
        class: String,
        kwargs: Option<usize>,
    },
    /// A call of such a partial: `module.class(**kwargs)`, never made.
    Call {
        module: String,
        class: String,
        kwargs: Option<usize>,
    },
}

/// A value read from a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True`, `False`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// A list or a tuple.
    List(Vec<Value>),
    /// A dict, in the pickle's order.
    Dict(Vec<(Value, Value)>),
    /// An object of `module.class`, with its attributes.
    Object {
        /// The class's module.
        module: String,
        /// The class.
        class: String,
        /// Its attributes (name, value).
        attributes: Vec<(String, Value)>,
    },
    /// A call `module.class(**kwargs)` (through `functools.partial`), read, never made.
    Call {
        /// The class's module.
        module: String,
        /// The class.
        class: String,
        /// The keyword arguments (name, value).
        kwargs: Vec<(String, Value)>,
    },
}

/// The stack machine.
#[derive(Default)]
struct Machine {
    arena: Vec<Node>,
    stack: Vec<Option<usize>>, // `None` is a mark
    memo: HashMap<u64, usize>,
    /// References made so far (stack entries, container items, memo entries).
    references: usize,
    /// Values unfolded by `resolve` so far, and the bytes of their text.
    unfolded: std::cell::Cell<(usize, usize)>,
}

impl Machine {
    /// Counts `n` more references, refused past [`MAX_REFERENCES`].
    fn reference(&mut self, n: usize) -> Result<(), String> {
        self.references += n;
        if self.references > MAX_REFERENCES {
            return Err(format!(
                "more than {MAX_REFERENCES} references (stack entries, items, memo entries)"
            ));
        }
        Ok(())
    }

    /// Pushes a mark (`None`) or a value's reference.
    fn push_ref(&mut self, id: Option<usize>) -> Result<(), String> {
        self.reference(1)?;
        self.stack.push(id);
        Ok(())
    }

    fn push(&mut self, node: Node) -> Result<(), String> {
        if self.arena.len() >= MAX_NODES {
            return Err(format!("more than {MAX_NODES} values"));
        }
        self.arena.push(node);
        self.push_ref(Some(self.arena.len() - 1))
    }

    fn pop(&mut self) -> Result<usize, String> {
        match self.stack.pop() {
            Some(Some(id)) => Ok(id),
            Some(None) => Err("a mark where a value was expected".into()),
            None => Err("the stack is empty".into()),
        }
    }

    fn top(&self) -> Result<usize, String> {
        match self.stack.last() {
            Some(Some(id)) => Ok(*id),
            _ => Err("no value on the stack".into()),
        }
    }

    /// The values above the last mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<usize>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(Option::is_none)
            .ok_or("no mark on the stack")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items.into_iter().flatten().collect())
    }

    fn set_items(&mut self, dict: usize, items: &[usize]) -> Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("a dict item without its value".into());
        }
        let Node::Dict(entries) = &mut self.arena[dict] else {
            return Err("items set on a value that is not a dict".into());
        };
        for pair in items.chunks(2) {
            entries.push((pair[0], pair[1]));
        }
        self.reference(items.len())
    }

    fn append(&mut self, list: usize, items: &[usize]) -> Result<(), String> {
        let Node::List(values) = &mut self.arena[list] else {
            return Err("items appended to a value that is not a list".into());
        };
        values.extend_from_slice(items);
        self.reference(items.len())
    }

    /// `REDUCE`, of the two forms the module docs name: `copy_reg._reconstructor(cls, object,
    /// None)` makes an object of `cls`, `functools.partial(cls)` a partial, and a call of that
    /// partial with no arguments a call of `cls`; nothing is run.
    fn reduce(&mut self, callable: usize, args: usize) -> Result<Node, String> {
        let no_args = matches!(&self.arena[args], Node::Tuple(a) if a.is_empty());
        let name = match &self.arena[callable] {
            Node::Global(module, name) => format!("{module}.{name}"),
            Node::Partial {
                module,
                class,
                kwargs,
            } if no_args => {
                return Ok(Node::Call {
                    module: module.clone(),
                    class: class.clone(),
                    kwargs: *kwargs,
                })
            }
            _ => return Err("a call of a value that is not a name".into()),
        };
        if name == "functools.partial" {
            let Node::Tuple(args) = &self.arena[args] else {
                return Err("partial's arguments are not a tuple".into());
            };
            return match args[..] {
                [class] => match &self.arena[class] {
                    Node::Global(module, class) => Ok(Node::Partial {
                        module: module.clone(),
                        class: class.clone(),
                        kwargs: None,
                    }),
                    _ => Err("a partial of a value that is not a name".into()),
                },
                _ => Err("a partial with positional arguments".into()),
            };
        }
        if name != "copy_reg._reconstructor" && name != "copyreg._reconstructor" {
            return Err(format!(
                "it calls {name}: this reader runs nothing (it only makes objects)"
            ));
        }
        let Node::Tuple(args) = &self.arena[args] else {
            return Err("_reconstructor's arguments are not a tuple".into());
        };
        let [class, base, state] = args[..] else {
            return Err("_reconstructor takes 3 arguments".into());
        };
        let base_ok = matches!(&self.arena[base], Node::Global(m, n)
            if (m == "__builtin__" || m == "builtins") && n == "object");
        if !base_ok || !matches!(self.arena[state], Node::None) {
            return Err("an object built on another base than `object`".into());
        }
        match &self.arena[class] {
            Node::Global(module, class) => Ok(Node::Object {
                module: module.clone(),
                class: class.clone(),
                state: None,
            }),
            _ => Err("_reconstructor's class is not a name".into()),
        }
    }

    fn resolve(&self, id: usize, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(format!("values nested deeper than {MAX_DEPTH}"));
        }
        let text = match &self.arena[id] {
            Node::Str(s) => s.len(),
            Node::Object { module, class, .. }
            | Node::Partial { module, class, .. }
            | Node::Call { module, class, .. } => module.len() + class.len(),
            _ => 0,
        };
        let (values, bytes) = self.unfolded.get();
        let (values, bytes) = (values + 1, bytes + text);
        self.unfolded.set((values, bytes));
        if values > MAX_VALUES {
            return Err(format!("more than {MAX_VALUES} values"));
        }
        if bytes > MAX_TEXT_BYTES {
            return Err(format!("more than {MAX_TEXT_BYTES} bytes of text"));
        }
        let all = |ids: &[usize]| -> Result<Vec<Value>, String> {
            ids.iter().map(|&i| self.resolve(i, depth + 1)).collect()
        };
        Ok(match &self.arena[id] {
            Node::None => Value::None,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::Int(*i),
            Node::Float(f) => Value::Float(*f),
            Node::Str(s) => Value::Str(s.clone()),
            Node::List(ids) | Node::Tuple(ids) => Value::List(all(ids)?),
            Node::Dict(entries) => Value::Dict(
                entries
                    .iter()
                    .map(|&(k, v)| Ok((self.resolve(k, depth + 1)?, self.resolve(v, depth + 1)?)))
                    .collect::<Result<_, String>>()?,
            ),
            Node::Global(module, name) => {
                return Err(format!(
                    "a bare name {module}.{name} where a value was expected"
                ))
            }
            Node::Partial { module, class, .. } => {
                return Err(format!(
                    "a partial of {module}.{class} that is never called"
                ))
            }
            Node::Call {
                module,
                class,
                kwargs,
            } => Value::Call {
                module: module.clone(),
                class: class.clone(),
                kwargs: self.named(*kwargs, depth, &|| format!("{module}.{class}'s arguments"))?,
            },
            Node::Object {
                module,
                class,
                state,
            } => Value::Object {
                module: module.clone(),
                class: class.clone(),
                attributes: self.named(*state, depth, &|| format!("{module}.{class}'s state"))?,
            },
        })
    }

    /// A dict of named values (an object's attributes, a call's keyword arguments), a name
    /// given twice keeping its last value, as in Python; none when `dict` is `None`. `what`
    /// names the dict in errors.
    fn named(
        &self,
        dict: Option<usize>,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<(String, Value)>, String> {
        let Some(dict) = dict else {
            return Ok(Vec::new());
        };
        match self.resolve(dict, depth + 1)? {
            Value::None => Ok(Vec::new()),
            Value::Dict(entries) => Ok(last_wins(
                entries
                    .into_iter()
                    .map(|(k, v)| match k {
                        Value::Str(name) => Ok((name, v)),
                        other => Err(format!("{}: a name {other:?}", what())),
                    })
                    .collect::<Result<_, String>>()?,
            )),
            _ => Err(format!("{} is not a dict", what())),
        }
    }
}

/// Reads a pickle of protocol 0 as data (see the [module docs](self)).
///
/// ```
/// use kvstore_pslite::pickle::{read, Value};
/// let v = read(b"(dp0\nVlr\np1\nF0.1\ns.").unwrap();
/// assert_eq!(v, Value::Dict(vec![(Value::Str("lr".into()), Value::Float(0.1))]));
/// // A pickle that would run a command is refused, and runs nothing.
/// let e = read(b"cos\nsystem\n(S'touch /tmp/x'\ntR.").unwrap_err();
/// assert!(e.contains("it calls os.system"));
/// ```
///
/// # Errors
/// An opcode other than protocol 0's (and `}`, `]`, `)`, `u`, `e`), a call other than the two
/// forms of the module docs, a pickle past their limits, or a malformed pickle, each named.
pub fn read(bytes: &[u8]) -> Result<Value, String> {
    let mut m = Machine::default();
    let mut at = 0;
    let raw_line = |at: &mut usize| -> Result<&[u8], String> {
        let rest = &bytes[*at..];
        let end = rest
            .iter()
            .take(MAX_LINE + 1)
            .position(|&b| b == b'\n')
            .ok_or(format!("a line without its end within {MAX_LINE} bytes"))?;
        *at += end + 1;
        Ok(&rest[..end])
    };
    let line = |at: &mut usize| -> Result<&str, String> {
        let text = raw_line(at)?;
        std::str::from_utf8(text).map_err(|_| "a line that is not UTF-8".to_string())
    };
    loop {
        let Some(&op) = bytes.get(at) else {
            return Err("the pickle ends before its STOP".into());
        };
        at += 1;
        let opcode_at = at - 1;
        let step: Result<(), String> = (|| {
            match op {
                b'(' => m.push_ref(None)?,
                b'.' => return Ok(()),
                b'0' => drop(m.stack.pop().ok_or("POP of an empty stack")?),
                b'1' => drop(m.pop_mark()?),
                b'2' => {
                    let top = m.top()?;
                    m.push_ref(Some(top))?;
                }
                b'N' => m.push(Node::None)?,
                b'I' => {
                    let text = line(&mut at)?;
                    m.push(match text {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        _ => Node::Int(decimal(text).ok_or_else(|| format!("INT {text:?}"))?),
                    })?;
                }
                b'L' => {
                    let text = line(&mut at)?;
                    let digits = text.strip_suffix('L').unwrap_or(text);
                    m.push(Node::Int(
                        decimal(digits).ok_or_else(|| format!("LONG {text:?}"))?,
                    ))?;
                }
                b'F' => {
                    let text = line(&mut at)?;
                    // Python refuses a finite number too large for a float (OverflowError).
                    let value: f64 = text.parse().map_err(|_| format!("FLOAT {text:?}"))?;
                    let literal = text.to_ascii_lowercase();
                    if value.is_infinite() && !literal.contains("inf") {
                        return Err(format!("FLOAT {text:?} overflows"));
                    }
                    m.push(Node::Float(value))?;
                }
                b'S' => {
                    let text = line(&mut at)?;
                    m.push(Node::Str(quoted(text)?))?;
                }
                b'V' => {
                    // raw-unicode-escape: each byte is a character (Latin-1), as Python reads
                    // it, then the escapes.
                    let text: String = raw_line(&mut at)?.iter().map(|&b| char::from(b)).collect();
                    m.push(Node::Str(raw_unicode(&text)?))?;
                }
                b'c' => {
                    let module = line(&mut at)?.to_string();
                    let name = line(&mut at)?.to_string();
                    m.push(Node::Global(module, name))?;
                }
                b'd' => {
                    let items = m.pop_mark()?;
                    m.push(Node::Dict(Vec::new()))?;
                    let dict = m.top()?;
                    m.set_items(dict, &items)?;
                }
                b'l' => {
                    let items = m.pop_mark()?;
                    m.push(Node::List(items))?;
                }
                b't' => {
                    let items = m.pop_mark()?;
                    m.push(Node::Tuple(items))?;
                }
                b'}' => m.push(Node::Dict(Vec::new()))?,
                b']' => m.push(Node::List(Vec::new()))?,
                b')' => m.push(Node::Tuple(Vec::new()))?,
                b's' => {
                    let value = m.pop()?;
                    let key = m.pop()?;
                    let dict = m.top()?;
                    m.set_items(dict, &[key, value])?;
                }
                b'u' => {
                    let items = m.pop_mark()?;
                    let dict = m.top()?;
                    m.set_items(dict, &items)?;
                }
                b'a' => {
                    let value = m.pop()?;
                    let list = m.top()?;
                    m.append(list, &[value])?;
                }
                b'e' => {
                    let items = m.pop_mark()?;
                    let list = m.top()?;
                    m.append(list, &items)?;
                }
                b'p' => {
                    let text = line(&mut at)?;
                    let index = text.parse().map_err(|_| format!("PUT {text:?}"))?;
                    let top = m.top()?;
                    m.reference(1)?;
                    m.memo.insert(index, top);
                }
                b'g' => {
                    let text = line(&mut at)?;
                    let index: u64 = text.parse().map_err(|_| format!("GET {text:?}"))?;
                    let id = *m
                        .memo
                        .get(&index)
                        .ok_or_else(|| format!("GET {index} of nothing"))?;
                    m.push_ref(Some(id))?;
                }
                b'R' => {
                    let args = m.pop()?;
                    let callable = m.pop()?;
                    let object = m.reduce(callable, args)?;
                    m.push(object)?;
                }
                b'b' => {
                    let state = m.pop()?;
                    let object = m.top()?;
                    // A partial's state is (func, args, kwargs, dict): keyword arguments only.
                    let state = match &m.arena[object] {
                        Node::Partial { .. } => match &m.arena[state] {
                            Node::Tuple(parts) if parts.len() == 4 => {
                                // Python's partial takes its function from this state too.
                                let same = match (&m.arena[object], &m.arena[parts[0]]) {
                                    (Node::Partial { module, class, .. }, Node::Global(m2, c2)) => {
                                        module == m2 && class == c2
                                    }
                                    _ => false,
                                };
                                if !same {
                                    return Err(
                                        "a partial whose state names another function".into()
                                    );
                                }
                                let no_args =
                                    matches!(&m.arena[parts[1]], Node::Tuple(a) if a.is_empty());
                                let no_dict = matches!(m.arena[parts[3]], Node::None)
                                    || matches!(&m.arena[parts[3]], Node::Dict(d) if d.is_empty());
                                if !no_args || !no_dict {
                                    return Err("a partial with positional arguments".into());
                                }
                                parts[2]
                            }
                            _ => return Err("a partial's state is not its 4 parts".into()),
                        },
                        _ => state,
                    };
                    let (Node::Object { state: slot, .. } | Node::Partial { kwargs: slot, .. }) =
                        &mut m.arena[object]
                    else {
                        return Err("BUILD of a value that is not an object".into());
                    };
                    if slot.replace(state).is_some() {
                        return Err("an object built twice".into());
                    }
                }
                other => {
                    return Err(format!(
                        "opcode {:?}: not one of protocol 0's this reader knows",
                        other as char
                    ))
                }
            }
            Ok(())
        })();
        step.map_err(|e| format!("pickle byte {opcode_at}: {e}"))?;
        if op == b'.' {
            let top = m.pop()?;
            return m.resolve(top, 0);
        }
    }
}

/// `entries` with each name once, at its first place, with its last value (a dict's meaning).
fn last_wins(entries: Vec<(String, Value)>) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::with_capacity(entries.len());
    let mut at: HashMap<String, usize> = HashMap::with_capacity(entries.len());
    for (name, value) in entries {
        match at.get(&name) {
            Some(&i) => out[i].1 = value,
            None => {
                at.insert(name.clone(), out.len());
                out.push((name, value));
            }
        }
    }
    out
}

/// A decimal integer as Python's unpickler reads one: digits with an optional `-`, no leading
/// zero (C's `strtol` with base 0 would read `010` as octal), nothing else.
fn decimal(text: &str) -> Option<i64> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

/// A Python 2 string literal of `STRING`: `'...'` or `"..."` with backslash escapes.
fn quoted(text: &str) -> Result<String, String> {
    let inner = text
        .strip_prefix('\'')
        .and_then(|t| t.strip_suffix('\''))
        .or_else(|| text.strip_prefix('"').and_then(|t| t.strip_suffix('"')))
        .ok_or_else(|| format!("STRING {text:?} is not quoted"))?;
    unescape(inner, false)
}

/// `UNICODE`'s raw-unicode-escape text: `\uXXXX` and `\UXXXXXXXX` escapes, the rest as is.
fn raw_unicode(text: &str) -> Result<String, String> {
    unescape(text, true)
}

fn unescape(text: &str, raw: bool) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(next) = chars.next() else {
            out.push('\\');
            break;
        };
        let hex = |chars: &mut std::str::Chars<'_>, n: usize| -> Result<char, String> {
            let digits: String = chars.by_ref().take(n).collect();
            let hex = digits.len() == n && digits.chars().all(|c| c.is_ascii_hexdigit());
            u32::from_str_radix(&digits, 16)
                .ok()
                .filter(|_| hex)
                .and_then(char::from_u32)
                .ok_or_else(|| format!("a bad escape in {text:?}"))
        };
        match (next, raw) {
            ('u', _) => out.push(hex(&mut chars, 4)?),
            ('U', _) => out.push(hex(&mut chars, 8)?),
            (other, true) => {
                out.push('\\');
                out.push(other);
            }
            ('x', false) => out.push(hex(&mut chars, 2)?),
            ('n', false) => out.push('\n'),
            ('t', false) => out.push('\t'),
            ('r', false) => out.push('\r'),
            ('\\' | '\'' | '"', false) => out.push(next),
            (other, false) => return Err(format!("escape \\{other} in {text:?}")),
        }
    }
    Ok(out)
}

/// The attributes of an MXNet optimizer that are its bookkeeping, not its settings.
const BOOKKEEPING: &[&str] = &[
    "aggregate_num",
    "allow_np_array",
    "sym_info",
    "param_dict",
    "_all_index_update_counts",
];

/// The [`OptimizerSpec`] of an MXNet 1.9.1 optimizer pickled by `kv.set_optimizer` (see the
/// [module docs](self)): its class names it as MXNet registers it (`SGD` is `sgd`); its
/// attributes
/// are its hyper-parameters under the names `kvstore-optimizer` reads (`lr` is
/// `learning_rate`, `idx2name` is `param_idx2name`), its learning-rate scheduler a map with
/// its `type` and state; `None` attributes are left out.
///
/// # Errors
/// The pickle cannot be read ([`read`]); it is not an object of one of MXNet's optimizer
/// classes, or its scheduler not one of MXNet's; or the optimizer already made updates (its
/// states are not in the pickle, so that it could not go on where it was).
pub fn optimizer_spec(bytes: &[u8]) -> Result<OptimizerSpec, String> {
    let (module, class, attributes) = match read(bytes)? {
        Value::Object {
            module,
            class,
            attributes,
        } => (module, class, attributes),
        Value::Call {
            module,
            class,
            kwargs,
        } => return constructed_spec(&module, &class, kwargs),
        _ => return Err("the pickle is not an object".into()),
    };
    let mut spec = OptimizerSpec::new(optimizer_name(&module, &class)?);
    let mut counts = (None, None);
    for (name, value) in attributes {
        if BOOKKEEPING.contains(&name.as_str()) || value == Value::None {
            continue;
        }
        match name.as_str() {
            "num_update" => counts.0 = Some(value),
            "begin_num_update" => {
                counts.1 = Some(value.clone());
                spec.params.insert(name, param(&value)?);
            }
            "_index_update_count" => {
                if value != Value::Dict(Vec::new()) {
                    return Err(format!(
                        "the {class} optimizer already made updates: its states are not sent \
                         with it"
                    ));
                }
            }
            "lr" => drop(spec.params.insert("learning_rate".into(), param(&value)?)),
            // AdaGrad's and GroupAdaGrad's `eps`, kept under another name.
            "float_stable_eps" => drop(spec.params.insert("eps".into(), param(&value)?)),
            // Nadam's running product, DCASGD's previous weights and LARS's count of skipped
            // steps: state, at its start value in an optimizer that made no update.
            "m_schedule" | "weight_previous" | "skip" => {
                let fresh = matches!(value, Value::Float(f) if f == 1.0)
                    || value == Value::Dict(Vec::new())
                    || value == Value::Int(0);
                if !fresh {
                    return Err(format!(
                        "the {class} optimizer already made updates ({name}): its states are \
                         not sent with it"
                    ));
                }
            }
            "idx2name" => drop(spec.params.insert("param_idx2name".into(), param(&value)?)),
            "lr_scheduler" => drop(spec.params.insert(name, scheduler(value)?)),
            _ => drop(spec.params.insert(name, param(&value)?)),
        }
    }
    if counts.0 != counts.1 {
        return Err(format!(
            "the {class} optimizer already made updates (num_update {:?}): its states are not \
             sent with it",
            counts.0
        ));
    }
    Ok(spec)
}

/// The spec of `module.class(**kwargs)`: the optimizer MXNet registers under that class, with
/// the keyword arguments as its hyper-parameters (its scheduler a call of a scheduler class).
fn constructed_spec(
    module: &str,
    class: &str,
    kwargs: Vec<(String, Value)>,
) -> Result<OptimizerSpec, String> {
    let mut spec = OptimizerSpec::new(optimizer_name(module, class)?);
    for (key, value) in kwargs {
        let value = match (key.as_str(), value) {
            (_, Value::None) => continue,
            (
                "lr_scheduler",
                Value::Call {
                    module,
                    class,
                    kwargs,
                },
            ) => {
                let kind = scheduler_kind(&module, &class)?;
                let mut map = BTreeMap::from([("type".to_string(), ParamValue::from(kind))]);
                for (k, v) in kwargs.into_iter().filter(|(_, v)| *v != Value::None) {
                    map.insert(k, param(&v)?);
                }
                ParamValue::Map(map)
            }
            (_, value) => param(&value).map_err(|e| format!("{key}: {e}"))?,
        };
        spec.params.insert(key, value);
    }
    Ok(spec)
}

/// The name MXNet registers the optimizer class `module.class` under.
fn optimizer_name(module: &str, class: &str) -> Result<&'static str, String> {
    MXNET_OPTIMIZERS
        .iter()
        .find(|(_, m, c)| *m == module && *c == class)
        .map(|(name, _, _)| *name)
        .ok_or_else(|| format!("{module}.{class} is not one of MXNet's optimizers"))
}

/// The `kvstore-optimizer` type of MXNet's scheduler class `module.class`.
fn scheduler_kind(module: &str, class: &str) -> Result<&'static str, String> {
    MXNET_SCHEDULERS
        .iter()
        .find(|(_, c)| module == SCHEDULER_MODULE && *c == class)
        .map(|(kind, _)| *kind)
        .ok_or_else(|| format!("{module}.{class} is not one of MXNet's schedulers"))
}

/// MXNet 1.9.1's optimizer classes by the names it registers them under
/// (`mx.optimizer.Optimizer.opt_registry`; `kvstore-optimizer` has all but `lbsgd` and
/// `sgld`).
const MXNET_OPTIMIZERS: &[(&str, &str, &str)] = &[
    ("sgd", "mxnet.optimizer.optimizer", "SGD"),
    ("signum", "mxnet.optimizer.optimizer", "Signum"),
    ("ftml", "mxnet.optimizer.optimizer", "FTML"),
    ("lars", "mxnet.optimizer.optimizer", "LARS"),
    ("lbsgd", "mxnet.optimizer.optimizer", "LBSGD"),
    ("lamb", "mxnet.optimizer.optimizer", "LAMB"),
    ("dcasgd", "mxnet.optimizer.optimizer", "DCASGD"),
    ("nag", "mxnet.optimizer.optimizer", "NAG"),
    ("sgld", "mxnet.optimizer.optimizer", "SGLD"),
    ("ccsgd", "mxnet.optimizer.optimizer", "ccSGD"),
    ("adam", "mxnet.optimizer.optimizer", "Adam"),
    ("adagrad", "mxnet.optimizer.optimizer", "AdaGrad"),
    ("rmsprop", "mxnet.optimizer.optimizer", "RMSProp"),
    ("adadelta", "mxnet.optimizer.optimizer", "AdaDelta"),
    ("ftrl", "mxnet.optimizer.optimizer", "Ftrl"),
    ("adamax", "mxnet.optimizer.optimizer", "Adamax"),
    ("nadam", "mxnet.optimizer.optimizer", "Nadam"),
    ("test", "mxnet.optimizer.optimizer", "Test"),
    ("groupadagrad", "mxnet.optimizer.contrib", "GroupAdaGrad"),
];

/// The optimizers whose MXNet 1.9.1 constructor takes `lazy_update`.
const TAKE_LAZY_UPDATE: &[&str] = &["sgd", "ccsgd", "adam", "lars"];

/// MXNet's learning-rate scheduler classes by `kvstore-optimizer`'s scheduler types.
const MXNET_SCHEDULERS: &[(&str, &str)] = &[
    ("factor", "FactorScheduler"),
    ("multifactor", "MultiFactorScheduler"),
    ("poly", "PolyScheduler"),
    ("cosine", "CosineScheduler"),
];

/// The pickle (protocol 0) of `spec` that MXNet 1.9.1's server turns into its own optimizer:
/// `functools.partial(<MXNet's class>, **hyper-parameters)()`, the scheduler likewise. What
/// MXNet's constructors do not take is refused: an optimizer MXNet 1.9.1 does not have
/// (`adamw`), per-parameter multipliers (`lr_mult`, `wd_mult`: MXNet sets them by method),
/// a scheduler's saved state.
///
/// ```
/// use kvstore_base::OptimizerSpec;
/// use kvstore_pslite::pickle::{mxnet_optimizer_pickle, optimizer_spec};
///
/// let sgd = OptimizerSpec::new("sgd").with("learning_rate", 0.1).with("momentum", 0.9);
/// let pickle = mxnet_optimizer_pickle(&sgd).unwrap();
/// assert!(pickle.starts_with(b"cfunctools\npartial\n(cmxnet.optimizer.optimizer\nSGD\n"));
/// // This crate's server reads it back as the same spec.
/// assert_eq!(optimizer_spec(&pickle).unwrap(), sgd);
/// ```
///
/// # Errors
/// As said above, naming the optimizer or the hyper-parameter.
pub fn mxnet_optimizer_pickle(spec: &OptimizerSpec) -> Result<Vec<u8>, String> {
    let name = spec.name.to_lowercase();
    let (_, module, class) = MXNET_OPTIMIZERS
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| format!("optimizer {name:?}: MXNet 1.9.1 has no such optimizer"))?;
    let mut kwargs: Vec<(String, Vec<u8>)> = Vec::new();
    for (key, value) in &spec.params {
        if key == "lazy_update" && !TAKE_LAZY_UPDATE.contains(&name.as_str()) {
            // kvstore-optimizer takes it for every optimizer (it changes nothing without
            // row-sparse gradients); MXNet's constructors other than these raise on it.
            continue;
        }
        let bytes = match (key.as_str(), value) {
            ("lr_mult" | "wd_mult", _) => {
                return Err(format!(
                    "{key}: MXNet's optimizers take per-parameter multipliers by method, not \
                     from their constructor"
                ))
            }
            ("lr_scheduler", ParamValue::Map(map)) => {
                let kind = match map.get("type") {
                    Some(ParamValue::Str(kind)) => kind.as_str(),
                    _ => return Err("lr_scheduler: a map with a type".into()),
                };
                let (_, class) = MXNET_SCHEDULERS
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .ok_or_else(|| format!("lr_scheduler: MXNet has no {kind:?} scheduler"))?;
                let mut args = Vec::new();
                for (k, v) in map.iter().filter(|(k, _)| k.as_str() != "type") {
                    if k.starts_with("state_") {
                        return Err(format!(
                            "lr_scheduler: {k}, a saved state, which MXNet's constructor does \
                             not take"
                        ));
                    }
                    args.push((k.clone(), pickled(v, false)));
                }
                call(SCHEDULER_MODULE, class, &args)
            }
            ("param_idx2name", value) => pickled(value, true),
            (_, value) => pickled(value, false),
        };
        kwargs.push((key.clone(), bytes));
    }
    let mut out = call(module, class, &kwargs);
    out.push(b'.');
    Ok(out)
}

/// `functools.partial(module.class, **kwargs)()`, each argument already pickled.
fn call(module: &str, class: &str, kwargs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = format!("cfunctools\npartial\n(c{module}\n{class}\ntR(c{module}\n{class}\n(t(d")
        .into_bytes();
    for (key, value) in kwargs {
        out.extend_from_slice(&text(key));
        out.extend_from_slice(value);
        out.push(b's');
    }
    // The partial's state (class, (), kwargs, None), then its call with no arguments.
    out.extend_from_slice(b"Ntb(tR");
    out
}

/// `value` in protocol 0; `int_keys`: map keys that are integers are written as integers
/// (MXNet's `param_idx2name` maps indices to names).
fn pickled(value: &ParamValue, int_keys: bool) -> Vec<u8> {
    match value {
        ParamValue::Bool(b) => format!("I0{}\n", u8::from(*b)).into_bytes(),
        ParamValue::Int(i) => format!("I{i}\n").into_bytes(),
        ParamValue::Float(f) => format!("F{f:?}\n").into_bytes(),
        ParamValue::Str(s) => text(s),
        ParamValue::List(items) => {
            let mut out = b"(".to_vec();
            for item in items {
                out.extend_from_slice(&pickled(item, int_keys));
            }
            out.push(b'l');
            out
        }
        ParamValue::Map(map) => {
            let mut out = b"(d".to_vec();
            for (k, v) in map {
                match (int_keys, k.parse::<i64>()) {
                    (true, Ok(i)) if i.to_string() == *k => {
                        out.extend_from_slice(format!("I{i}\n").as_bytes())
                    }
                    _ => out.extend_from_slice(&text(k)),
                }
                out.extend_from_slice(&pickled(v, int_keys));
                out.push(b's');
            }
            out
        }
    }
}

/// A string as `UNICODE` (raw-unicode-escape: `\uXXXX` for a backslash, a line end and every
/// character outside printable ASCII).
fn text(s: &str) -> Vec<u8> {
    let mut out = b"V".to_vec();
    for c in s.chars() {
        match c {
            ' '..='~' if c != '\\' => out.push(c as u8),
            c if (c as u32) <= 0xFFFF => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => out.extend_from_slice(format!("\\U{:08x}", c as u32).as_bytes()),
        }
    }
    out.push(b'\n');
    out
}

/// A plain value as a hyper-parameter; dict keys become text (`{0: 'w'}` is `{"0": "w"}`).
fn param(value: &Value) -> Result<ParamValue, String> {
    Ok(match value {
        Value::Bool(b) => ParamValue::Bool(*b),
        Value::Int(i) => ParamValue::Int(*i),
        Value::Float(f) => ParamValue::Float(*f),
        Value::Str(s) => ParamValue::Str(s.clone()),
        Value::List(items) => ParamValue::List(items.iter().map(param).collect::<Result<_, _>>()?),
        Value::Dict(entries) => ParamValue::Map(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::Str(s) => s.clone(),
                        Value::Int(i) => i.to_string(),
                        other => return Err(format!("a map keyed by {other:?}")),
                    };
                    Ok((key, param(v)?))
                })
                .collect::<Result<_, String>>()?,
        ),
        Value::None => return Err("None".into()),
        Value::Object { module, class, .. } | Value::Call { module, class, .. } => {
            return Err(format!(
                "an object of {module}.{class} as a hyper-parameter"
            ))
        }
    })
}

/// An MXNet learning-rate scheduler as `kvstore-optimizer` describes one: its type, its
/// settings as built, and its state (the current rate and counts).
fn scheduler(value: Value) -> Result<ParamValue, String> {
    let Value::Object {
        module,
        class,
        attributes,
    } = value
    else {
        return Err("lr_scheduler is not an object".into());
    };
    let kind = scheduler_kind(&module, &class)?;
    let attributes: BTreeMap<String, Value> = attributes.into_iter().collect();
    let mut map = BTreeMap::from([("type".to_string(), ParamValue::from(kind))]);
    // MXNet's `base_lr` is the current rate; `warmup_final_lr` keeps the rate it was built
    // with, which is what kvstore-optimizer's `base_lr` is.
    let renamed: &[(&str, &str)] = &[
        ("warmup_final_lr", "base_lr"),
        ("base_lr", "state_base_lr"),
        ("count", "state_count"),
        ("cur_step_ind", "state_cur_step_ind"),
        ("base_lr_orig", "state_base_lr_orig"),
        ("power", "pwr"),
    ];
    // Derived from the others (`max_update - warmup_steps`).
    let derived = ["max_steps"];
    for (name, value) in &attributes {
        if derived.contains(&name.as_str()) || *value == Value::None {
            continue;
        }
        let to = renamed
            .iter()
            .find(|(from, _)| from == name)
            .map_or(name.as_str(), |(_, to)| to);
        map.insert(to.to_string(), param(value)?);
    }
    if let Some(final_lr) = attributes.get("warmup_final_lr") {
        map.insert("state_warmup_final_lr".into(), param(final_lr)?);
    }
    Ok(ParamValue::Map(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps(mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=0.001,
    /// rescale_grad=0.5), 0)`, written by MXNet 1.9.1 (Python 3.11).
    const SGD: &str = "ccopy_reg\n_reconstructor\np0\n(cmxnet.optimizer.optimizer\nSGD\np1\n\
c__builtin__\nobject\np2\nNtp3\nRp4\n(dp5\nVrescale_grad\np6\nF0.5\nsVlr_scheduler\np7\nNsVlr\n\
p8\nF0.1\nsVwd\np9\nF0.001\nsVlr_mult\np10\n(dp11\nsVwd_mult\np12\n(dp13\nsVbegin_num_update\n\
p14\nI0\nsVnum_update\np15\nI0\nsV_all_index_update_counts\np16\n(dp17\nI0\n(dp18\nssV_index_up\
date_count\np19\ng18\nsVclip_gradient\np20\nNsVmulti_precision\np21\nI00\nsVaggregate_num\np22\n\
I4\nsVidx2name\np23\n(dp24\nsVsym_info\np25\n(tsVallow_np_array\np26\nI00\nsVmomentum\np27\n\
F0.9\nsVlazy_update\np28\nI01\nsb.";

    #[test]
    fn mxnets_sgd_becomes_its_spec() {
        let spec = optimizer_spec(SGD.as_bytes()).unwrap();
        assert_eq!(spec.name, "sgd");
        let f = |k: &str| spec.params[k].as_f64().unwrap();
        assert_eq!(f("learning_rate"), 0.1);
        assert_eq!(f("momentum"), 0.9);
        assert_eq!(f("wd"), 0.001);
        assert_eq!(f("rescale_grad"), 0.5);
        assert_eq!(spec.params["multi_precision"], ParamValue::Bool(false));
        assert_eq!(spec.params["lazy_update"], ParamValue::Bool(true));
        assert_eq!(spec.params["lr_mult"], ParamValue::Map(BTreeMap::new()));
        // Bookkeeping and None are left out; the spec builds MXNet's optimizer.
        for gone in [
            "aggregate_num",
            "sym_info",
            "clip_gradient",
            "lr_scheduler",
            "num_update",
        ] {
            assert!(!spec.params.contains_key(gone), "{gone}");
        }
        kvstore_optimizer::Updater::from_spec(&spec).unwrap();
    }

    #[test]
    fn calls_other_than_an_objects_reconstruction_are_refused() {
        for (pickle, needle) in [
            (
                &b"cos\nsystem\n(S'touch /tmp/x'\ntR."[..],
                "it calls os.system",
            ),
            (
                b"c__builtin__\neval\n(S'1'\ntR.",
                "it calls __builtin__.eval",
            ),
            (b"dp0\n.", "no mark"),
            (b"N", "ends before its STOP"),
            (b"X\x00\x00\x00\x00.", "opcode 'X'"),
        ] {
            let e = read(pickle).map(drop).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        // A reconstructed object of another class is read as data, but is no optimizer.
        let e =
            optimizer_spec(b"ccopy_reg\n_reconstructor\n(cos\nsystem\nc__builtin__\nobject\nNtR.")
                .unwrap_err();
        assert!(
            e.contains("os.system is not one of MXNet's optimizers"),
            "{e}"
        );
    }

    #[test]
    fn written_pickles_read_back_as_their_spec() {
        let mut schedule = BTreeMap::new();
        schedule.insert("type".to_string(), ParamValue::from("multifactor"));
        schedule.insert(
            "step".to_string(),
            ParamValue::List(vec![ParamValue::Int(2), ParamValue::Int(5)]),
        );
        schedule.insert("factor".to_string(), ParamValue::Float(0.5));
        let idx2name = BTreeMap::from([("0".to_string(), ParamValue::from("w\\é\n"))]);
        let spec = OptimizerSpec::new("adam")
            .with("learning_rate", 1e-3)
            .with("epsilon", 1e-8)
            .with("lazy_update", false)
            .with("begin_num_update", 3i64)
            .with("lr_scheduler", ParamValue::Map(schedule))
            .with("param_idx2name", ParamValue::Map(idx2name));
        let pickle = mxnet_optimizer_pickle(&spec).unwrap();
        assert!(pickle.is_ascii());
        assert_eq!(optimizer_spec(&pickle).unwrap(), spec);
        kvstore_optimizer::Updater::from_spec(&spec).unwrap();
        // What MXNet's constructors do not take.
        for (bad, needle) in [
            (
                OptimizerSpec::new("adamw"),
                "MXNet 1.9.1 has no such optimizer",
            ),
            (
                OptimizerSpec::new("sgd").with("lr_mult", ParamValue::Map(BTreeMap::new())),
                "by method",
            ),
        ] {
            let e = mxnet_optimizer_pickle(&bad).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn pythons_partial_pickle_reads_as_its_call() {
        // `pickle.dumps(functools.partial(mx.optimizer.SGD, learning_rate=0.1), 0)` by Python
        // 3.11, then called (`(tR`).
        let pickle = b"cfunctools\npartial\np0\n(cmxnet.optimizer.optimizer\nSGD\np1\ntp2\n\
Rp3\n(g1\n(t(dp4\nVlearning_rate\np5\nF0.1\nsNtp6\nb(tR.";
        let spec = optimizer_spec(pickle).unwrap();
        assert_eq!(spec, OptimizerSpec::new("sgd").with("learning_rate", 0.1));
        // A partial with positional arguments, or never called, is refused.
        let positional = b"cfunctools\npartial\n(cmxnet.optimizer.optimizer\nSGD\nI1\ntR.";
        assert!(read(positional).unwrap_err().contains("positional"));
        let uncalled = &pickle[..pickle.len() - 4];
        let uncalled = [uncalled, b"."].concat();
        assert!(read(&uncalled).unwrap_err().contains("never called"));
    }

    #[test]
    fn shared_values_cannot_unfold_without_bound() {
        // Each list holds the previous one twice: 2^25 values once unfolded.
        let mut pickle = b"(lp0\nI1\na".to_vec();
        for i in 1..=25 {
            pickle.extend_from_slice(format!("(lp{i}\ng{}\nag{}\na", i - 1, i - 1).as_bytes());
        }
        pickle.push(b'.');
        let e = read(&pickle).unwrap_err();
        assert!(e.contains("more than 100000 values"), "{e}");
        // A list that holds itself.
        let e = read(b"(lp0\ng0\na.").unwrap_err();
        assert!(e.contains("nested deeper"), "{e}");
    }

    #[test]
    fn references_without_values_are_bounded() {
        // Marks, duplicates and appends make references, not values: each is counted.
        let marks = [b"(".repeat(MAX_REFERENCES + 1), b".".to_vec()].concat();
        let dups = [b"N".to_vec(), b"2".repeat(MAX_REFERENCES), b".".to_vec()].concat();
        let appends = [
            b"(lNp1\n0".to_vec(),
            b"g1\na".repeat(MAX_REFERENCES),
            b".".to_vec(),
        ]
        .concat();
        for pickle in [marks, dups, appends] {
            let e = read(&pickle).unwrap_err();
            assert!(e.contains("references"), "{e}");
        }
    }

    #[test]
    fn an_optimizer_that_made_updates_is_refused() {
        let used = SGD.replace("num_update\np15\nI0", "num_update\np15\nI7");
        let e = optimizer_spec(used.as_bytes()).unwrap_err();
        assert!(e.contains("already made updates"), "{e}");
    }

    #[test]
    fn strings_and_memo_are_read_as_python_writes_them() {
        let v = read(b"(lp0\nS'a\\'b'\np1\naV\\u00e9\\u20ac\np2\nag1\na.").unwrap();
        assert_eq!(
            v,
            Value::List(vec![
                Value::Str("a'b".into()),
                Value::Str("é€".into()),
                Value::Str("a'b".into()),
            ])
        );
        // A container filled after it was memoised is seen filled through the memo.
        let v = read(b"(dp0\nVk\np1\n(lp2\nsg2\nI1\na0g0\n.").unwrap();
        assert_eq!(
            v,
            Value::Dict(vec![(
                Value::Str("k".into()),
                Value::List(vec![Value::Int(1)])
            )])
        );
    }

    #[test]
    fn mutated_pickles_never_panic() {
        use kvstore_test::fuzz::{mutated, Rng};
        let mut rng = Rng::new(0x9E1C_C1E5);
        let valid = vec![SGD.as_bytes().to_vec()];
        for _ in 0..20_000 {
            let bytes = mutated(&mut rng, &valid);
            let _ = optimizer_spec(&bytes);
        }
    }
}
