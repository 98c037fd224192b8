//! Property tests of the task-file parser: arbitrary text never panics and every error names
//! a real position (a token of a line of the input); generated valid files parse to what was
//! written, keep their positions, and survive parse -> print -> parse; a defect added to a
//! valid file is reported at the defect. The fuzz target `fuzz/fuzz_targets/task_file.rs`
//! runs the same checks (`support/taskfile.rs`) on fuzzer-chosen text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use p2p_tasks::parse::ParseErrorKind;
use p2p_tasks::task::Input;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use support::taskfile::{meaning, parse_and_check, Meaning};

/// Words that matter to the grammar, odd whitespace and odd characters.
fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(vec![
            "a1", "a2", "b1", "B1", "c10", "ab3_x.y-z", "after", "--", "#", "# c", "1a", "a",
            "cost", "timeout", "retries", "0", "7", "-1", "1.5", "3s", "1h30m", "99999999999",
            "a-1", "é1", "a1!", "\u{feff}", "\u{3000}", "\u{a0}", "\r", "\r\n", "\n", " ", "\t",
            "<", ">", "in.csv", "@a1/o", "@a1", "../x", "/abs", "a//b", "x/", ".", "@b1/../o",
        ])
        .prop_map(str::to_string),
        1 => "\\PC{1,4}",
        1 => "[a-c]{1,2}[0-9][a-z0-9_.-]{0,2}",
    ]
}

/// Text made of grammar words, glued or separated.
fn soup() -> impl Strategy<Value = String> {
    vec((word(), select(vec!["", " ", "\n", "\t"])), 0..30).prop_map(|parts| {
        parts
            .into_iter()
            .map(|(w, sep)| format!("{w}{sep}"))
            .collect()
    })
}

/// One task of a generated file: its id, dependencies (indexes of earlier tasks in the
/// generated order, so there is no cycle), arguments, and cost, timeout and retries clauses
/// (each as written, e.g. `cost 3`, and the value it means).
#[derive(Debug, Clone)]
struct Spec {
    id: String,
    deps: Vec<usize>,
    args: String,
    terms: Terms,
    /// The clauses are written before `after` (else after the dependencies).
    terms_first: bool,
    /// Input paths (`< PATH`), with distinct file names.
    inputs: Vec<String>,
    /// Outputs (`> NAME`), distinct.
    outputs: Vec<String>,
    /// An artifact input (`< @DEP/NAME`): the index of a dependency and which of its outputs.
    artifact: Option<(prop::sample::Index, prop::sample::Index)>,
}

/// A task's optional clauses: the words written (in a generated order) and what they mean.
#[derive(Debug, Clone, Default)]
struct Terms {
    written: Vec<String>,
    cost: u32,
    timeout: Option<std::time::Duration>,
    retries: Option<u32>,
}

/// Optional `cost`, `timeout` and `retries` clauses, in any order.
fn terms() -> impl Strategy<Value = Terms> {
    let timeouts = select(vec![
        ("0", 0u64),
        ("500ms", 500),
        ("3s", 3_000),
        ("2m", 120_000),
        ("1h30m", 5_400_000),
        ("1500ms", 1_500),
    ]);
    (
        prop::option::of(1u32..=u32::MAX),
        prop::option::of(timeouts),
        prop::option::of(any::<u32>()),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(cost, timeout, retries, rot)| {
            let mut t = Terms {
                cost: cost.unwrap_or(1),
                ..Terms::default()
            };
            if let Some(c) = cost {
                t.written.push(format!("cost {c}"));
            }
            if let Some((text, ms)) = timeout {
                t.written.push(format!("timeout {text}"));
                t.timeout = Some(std::time::Duration::from_millis(ms));
            }
            if let Some(n) = retries {
                t.written.push(format!("retries {n}"));
                t.retries = Some(n);
            }
            if !t.written.is_empty() {
                let k = rot.index(t.written.len());
                t.written.rotate_left(k);
            }
            t
        })
}

/// Whether a generated task is written without clauses (it may share its line).
fn is_plain(s: &Spec) -> bool {
    s.deps.is_empty()
        && s.args.is_empty()
        && s.terms.written.is_empty()
        && s.inputs.is_empty()
        && s.outputs.is_empty()
}

/// Whitespace between tokens.
fn gap() -> impl Strategy<Value = &'static str> {
    select(vec![" ", "  ", "\t", " \t ", "\u{3000}", "\u{a0}"])
}

/// A generated valid task file: the text and the tasks it declares, in file order.
fn valid_file() -> impl Strategy<Value = (String, Vec<Meaning>)> {
    let task = (
        "[a-zA-Z]{1,3}",
        "[a-zA-Z0-9_.-]{0,3}",
        vec(any::<prop::sample::Index>(), 0..3),
        prop_oneof![2 => Just(String::new()), 1 => "[^#\r\n]{0,16}"],
        prop_oneof![2 => Just(Terms { cost: 1, ..Terms::default() }), 1 => terms()],
        any::<bool>(),
        (
            vec("[a-z0-9_.-]{0,4}", 0..3),
            vec(prop_oneof!["[a-z_-]{0,3}", "[a-z]{1,3}/[a-z.]{0,3}"], 0..3),
            prop::option::of((any::<prop::sample::Index>(), any::<prop::sample::Index>())),
        ),
    );
    (
        vec(task, 1..24),
        vec(gap(), 64),
        any::<prop::sample::Index>(),
        vec(0u8..6, 24),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(raw, gaps, shuffle, layout, bom, crlf)| {
            // Unique ids: type letters, the task's number, a dot, a suffix (without the dot,
            // c + 1 + "1" and c + 11 + "" were both c11).
            let specs: Vec<Spec> = raw
                .iter()
                .enumerate()
                .map(
                    |(i, (letters, suffix, deps, args, terms, terms_first, files))| {
                        let (ins, outs, artifact) = files;
                        let mut deps: Vec<usize> = if i == 0 {
                            Vec::new()
                        } else {
                            deps.iter().map(|d| d.index(i)).collect()
                        };
                        let mut seen = std::collections::HashSet::new();
                        deps.retain(|d| seen.insert(*d));
                        Spec {
                            id: format!("{letters}{i}.{suffix}"),
                            deps,
                            args: args.trim().to_string(),
                            terms: terms.clone(),
                            terms_first: *terms_first,
                            // Distinct names by position: `d/p0x`, `p1`, ...
                            inputs: ins
                                .iter()
                                .enumerate()
                                .map(|(k, x)| format!("{}p{k}{x}", if k == 1 { "d/" } else { "" }))
                                .collect(),
                            outputs: outs
                                .iter()
                                .enumerate()
                                .map(|(k, x)| match x.split_once('/') {
                                    Some((dir, name)) => format!("{dir}/o{i}.{k}{name}"),
                                    None => format!("o{i}.{k}{x}"),
                                })
                                .collect(),
                            artifact: *artifact,
                        }
                    },
                )
                .collect();
            // Print them in a shuffled order (a dependency may be declared later).
            let mut order: Vec<usize> = (0..specs.len()).collect();
            let k = shuffle.index(order.len());
            order.rotate_left(k);
            let mut text = String::new();
            if bom {
                text.push('\u{feff}');
            }
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut g = gaps.iter().cycle();
            let mut expected = Vec::new();
            for (n, &i) in order.iter().enumerate() {
                let s = &specs[i];
                let plain = is_plain(s);
                match layout[n % layout.len()] {
                    0 => text.push_str(&format!("# a comment: after -- a1{nl}")),
                    1 => text.push_str(&format!("{}{nl}", g.next().unwrap())),
                    _ => {}
                }
                text.push_str(g.next().unwrap());
                text.push_str(&s.id);
                let mut terms = String::new();
                for w in &s.terms.written {
                    terms.push_str(g.next().unwrap());
                    terms.push_str(&w.replace(' ', g.next().unwrap()));
                }
                if s.terms_first {
                    text.push_str(&terms);
                }
                let deps: Vec<String> = s.deps.iter().map(|&d| specs[d].id.clone()).collect();
                if !deps.is_empty() {
                    text.push_str(&format!("{}after", g.next().unwrap()));
                    for d in &deps {
                        text.push_str(g.next().unwrap());
                        text.push_str(d);
                    }
                }
                if !s.terms_first {
                    text.push_str(&terms);
                }
                let mut inputs: Vec<Input> = Vec::new();
                for p in &s.inputs {
                    text.push_str(&format!("{}<{}{p}", g.next().unwrap(), g.next().unwrap()));
                    inputs.push(Input::Path(p.into()));
                }
                // An artifact of a dependency that declares outputs.
                let producers: Vec<usize> = s
                    .deps
                    .iter()
                    .copied()
                    .filter(|&d| !specs[d].outputs.is_empty())
                    .collect();
                if let (Some((which, out)), false) = (s.artifact, producers.is_empty()) {
                    let p = &specs[producers[which.index(producers.len())]];
                    let name = &p.outputs[out.index(p.outputs.len())];
                    text.push_str(&format!("{}< @{}/{name}", g.next().unwrap(), p.id));
                    inputs.push(Input::Artifact {
                        task: p.id.clone(),
                        name: name.clone(),
                    });
                }
                for o in &s.outputs {
                    text.push_str(&format!("{}>{}{o}", g.next().unwrap(), g.next().unwrap()));
                }
                if !s.args.is_empty() {
                    text.push_str(&format!(
                        "{}--{}{}",
                        g.next().unwrap(),
                        g.next().unwrap(),
                        s.args
                    ));
                }
                let comment = layout[n % layout.len()] == 2;
                if comment {
                    text.push_str(" # note -- after #");
                }
                // A plain task sometimes shares its line with the next task, when that one
                // is plain too (a task with clauses must be alone on its line).
                let next_plain = order.get(n + 1).is_some_and(|&j| is_plain(&specs[j]));
                let glue = plain && next_plain && !comment && layout[(n + 1) % layout.len()] == 3;
                if glue {
                    text.push_str(g.next().unwrap());
                } else {
                    text.push_str(nl);
                }
                let kind: String =
                    s.id.chars()
                        .take_while(char::is_ascii_alphabetic)
                        .map(|c| c.to_ascii_lowercase())
                        .collect();
                let t = &s.terms;
                expected.push((
                    s.id.clone(),
                    kind,
                    s.args.clone(),
                    deps,
                    (t.cost, t.timeout, t.retries),
                    (inputs, s.outputs.clone()),
                ));
            }
            (text, expected)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics_and_errors_name_a_real_position(text in "\\PC{0,200}") {
        let _ = parse_and_check(&text);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..300)) {
        let _ = parse_and_check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn grammar_soup_never_panics_and_errors_name_a_real_position(text in soup()) {
        let _ = parse_and_check(&text);
    }

    #[test]
    fn generated_files_parse_to_what_was_written((text, expected) in valid_file()) {
        match parse_and_check(&text) {
            Ok(tasks) => prop_assert_eq!(meaning(&tasks), expected, "{}", text),
            Err(e) => prop_assert!(false, "{}\n--- text ---\n{}", e, text),
        }
    }

    #[test]
    fn a_defect_is_reported_where_it_is(
        (text, expected) in valid_file(),
        indent in 0usize..6,
        bad in prop_oneof![
            Just("1a".to_string()),
            Just("a1!".to_string()),
            Just("-x".to_string()),
            "[0-9_.-][a-z0-9]{0,3}",
        ],
        duplicate in any::<prop::sample::Index>(),
        use_duplicate in any::<bool>(),
    ) {
        let (token, kind) = if use_duplicate {
            (expected[duplicate.index(expected.len())].0.clone(), ParseErrorKind::DuplicateId)
        } else {
            (bad, ParseErrorKind::InvalidId)
        };
        let line_no = super_lines(&text) + 1;
        let text = format!("{text}\n{}{token} a9999\n", " ".repeat(indent));
        let err = parse_and_check(&text).unwrap_err();
        prop_assert_eq!(err.kind, kind, "{}", err);
        prop_assert_eq!((err.line as usize, err.col as usize), (line_no, indent + 1), "{}", err);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn an_output_outside_the_working_directory_is_reported_at_its_word(
        (text, _) in valid_file(),
        pre in "[a-z]{0,3}",
        bad in select(vec!["..", "/", "//", "/.", "/..", "./", "../"]),
        post in "[a-z]{0,3}",
    ) {
        let name = format!("{pre}{bad}{post}");
        prop_assume!(p2p_tasks::task::output_name_problem(&name).is_some());
        let line_no = super_lines(&text) + 1;
        let text = format!("{text}\nz9999 > {name}\n");
        let err = parse_and_check(&text).unwrap_err();
        prop_assert_eq!(err.kind, ParseErrorKind::File, "{}", err);
        prop_assert_eq!((err.line as usize, err.col), (line_no, 9), "{}", err);
    }
}

/// How many lines the parser sees in `text` before a line is appended after a `\n`.
fn super_lines(text: &str) -> usize {
    // `format!("{text}\n...")`: when `text` already ends with a line end, the added `\n`
    // makes an empty line first.
    support::taskfile::lines(&format!("{text}\n")).len()
}
