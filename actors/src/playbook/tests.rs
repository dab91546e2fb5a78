//! Playbook validation: every error names the file, the step and the problem.

use super::*;

fn defaults() -> StepDefaults {
    StepDefaults {
        max_attempts: 3,
        timeout_ms: 1000,
    }
}

fn parse(text: &str) -> Result<Playbook, PlaybookError> {
    Playbook::parse(text, Path::new("pb.toml"), &defaults())
}

fn err(text: &str) -> String {
    parse(text).expect_err("must be refused").to_string()
}

const OK: &str = r#"
name = "ok"
[[steps]]
id = "a"
tool = "file.write"
params = { path = "{{input.root}}/x", content = "{{input.text}}" }
verify = { file_exists = true }
[[steps]]
id = "b"
tool = "http.request"
depends_on = ["a"]
params = { url = "{{input.url}}", json = { sha = "{{steps.a.output.sha256}}" } }
verify = { status_in = [200] }
"#;

#[test]
fn a_valid_playbook_plans_with_input() {
    let pb = parse(OK).unwrap();
    assert!(pb.version.starts_with("0@"));
    let (steps, _) = pb
        .plan(
            "t1",
            &serde_json::json!({"root": "/r", "text": "hi", "url": "http://x"}),
            &Value::Null,
        )
        .unwrap();
    assert_eq!(
        steps[0].params.to_value().unwrap(),
        serde_json::json!({"path": "/r/x", "content": "hi"})
    );
    assert!(
        steps[1].params.0.contains("{{steps.a.output.sha256}}"),
        "step outputs render at dispatch"
    );
    let missing = pb
        .plan("t1", &serde_json::json!({"root": "/r"}), &Value::Null)
        .unwrap_err();
    assert_eq!(missing.to_string(), "step `a`: `input.text` is missing");
}

#[test]
fn errors_name_file_step_and_problem() {
    assert_eq!(
        err("name = \"x\"\n"),
        "pb.toml: has 0 steps; a playbook has 1 to 7 steps (or a `goal` for the LLM planner)"
    );
    let eight: String = (0..8).map(|i| format!("[[steps]]\nid = \"s{i}\"\ntool = \"file.write\"\nparams = {{ path = \"/a\", content = \"\" }}\nverify = {{ file_exists = true }}\n")).collect();
    assert!(err(&format!("name = \"x\"\n{eight}")).contains("has 8 steps"));
    let unknown_tool = OK.replace("http.request", "http.get");
    assert!(err(&unknown_tool).contains(
        "pb.toml: step `b`: unknown tool `http.get` (known: file.write, http.request, shell.run, context.put, llm.generate, wait, email.send)"
    ));
    let bad_dep = OK.replace("depends_on = [\"a\"]", "depends_on = [\"zz\"]");
    assert_eq!(
        err(&bad_dep),
        "pb.toml: step `b`: depends_on names `zz`, which is not a step"
    );
    let undeclared = OK.replace("depends_on = [\"a\"]\n", "");
    assert!(
        err(&undeclared).contains("reads step `a`, which must be in depends_on"),
        "{}",
        err(&undeclared)
    );
    let typo = OK.replace("file_exists", "file_exist");
    assert!(
        err(&typo).contains("unknown field `file_exist`"),
        "{}",
        err(&typo)
    );
    let no_verify = OK.replace("verify = { status_in = [200] }", "");
    assert_eq!(
        err(&no_verify),
        "pb.toml: step `b`: has no `verify` criteria"
    );
    let bad_param = OK.replace("json = {", "jsn = {");
    assert!(err(&bad_param).contains("`http.request` has no param `jsn`"));
    let missing_param = OK.replace("content = \"{{input.text}}\"", "");
    assert!(err(&missing_param).contains("`file.write` needs param `content`"));
    let bad_template = OK.replace("{{input.text}}", "{{input.text");
    assert!(err(&bad_template).contains("unclosed"));
    let bad_root = OK.replace("{{input.text}}", "{{secrets.x}}");
    assert!(err(&bad_root).contains("templates read input.*"));
    let verify_reads_steps = OK.replace(
        "status_in = [200]",
        "output_contains = \"{{steps.a.output.sha256}}\"",
    );
    assert!(
        err(&verify_reads_steps).contains("criteria read input.*, task.* and persona.* only"),
        "{}",
        err(&verify_reads_steps)
    );
    let zero_timeout = OK.replace("id = \"b\"", "id = \"b\"\ntimeout_ms = 0");
    assert!(
        err(&zero_timeout).contains("timeout_ms 0 must be 1 to 86400000"),
        "{}",
        err(&zero_timeout)
    );
    let dup = OK.replace("id = \"b\"", "id = \"a\"");
    assert!(err(&dup).contains("id is used twice"));
    let bad_toml = "name = \"x\"\n[[steps]\n";
    assert!(err(bad_toml).starts_with("pb.toml: "));
}

#[test]
fn cycles_are_refused() {
    let cyclic = r#"
name = "c"
[[steps]]
id = "a"
tool = "file.write"
depends_on = ["b"]
params = { path = "/a", content = "" }
verify = { file_exists = true }
[[steps]]
id = "b"
tool = "file.write"
depends_on = ["a"]
params = { path = "/b", content = "" }
verify = { file_exists = true }
"#;
    assert_eq!(
        err(cyclic),
        "pb.toml: depends_on forms a cycle among steps a, b"
    );
}

#[test]
fn shipped_playbooks_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../playbooks");
    let catalog = Catalog::load_dir(&dir, &defaults()).unwrap();
    assert_eq!(catalog.names(), ["client-onboarding", "weekly-newsletter"]);
}

#[test]
fn a_directory_reports_every_bad_file_and_duplicate_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), OK).unwrap();
    std::fs::write(dir.path().join("b.toml"), OK).unwrap();
    std::fs::write(dir.path().join("c.toml"), "name = 1").unwrap();
    let errors = Catalog::load_dir(dir.path(), &defaults()).unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0]
            .to_string()
            .contains("b.toml: name `ok` is also used by")
    );
    assert!(errors[1].to_string().contains("c.toml"));
}

const SAGA: &str = r#"
name = "saga"
persona = "bookkeeper"
[[steps]]
id = "crm"
tool = "http.request"
params = { method = "POST", url = "{{input.url}}/clients" }
verify = { status_in = [201] }
compensate = { tool = "http.request", params = { method = "POST", url = "{{input.url}}/clients/{{steps.crm.output.body.id}}/delete" }, max_attempts = 5 }
"#;

#[test]
fn a_compensation_is_planned_as_an_undo_step_that_may_read_its_step() {
    let pb = parse(SAGA).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pb.persona, "bookkeeper");
    let (steps, _) = pb
        .plan("T1", &json!({"url": "http://crm"}), &Value::Null)
        .unwrap_or_else(|e| panic!("{e}"));
    let undo = steps[0].compensate.as_deref().expect("an undo step");
    assert_eq!(undo.id, "crm.undo");
    assert_eq!(undo.compensates.as_deref(), Some("crm"));
    assert_eq!(undo.max_attempts, 5);
    assert!(undo.verify.is_empty(), "verify is optional for an undo");
    // It reads the step's output: rendered at dispatch.
    assert!(undo.params_template.is_some());

    let e = err(&SAGA.replace("steps.crm.output", "steps.other.output"));
    assert!(
        e.contains("step `crm`: compensate: `{{steps.other.output.body.id}}` reads step `other`"),
        "{e}"
    );
    let e = err(&SAGA.replace(
        r#"compensate = { tool = "http.request""#,
        r#"compensate = { tool = "mail.send""#,
    ));
    assert!(e.contains("compensate: unknown tool `mail.send`"), "{e}");
    let e = err(&SAGA.replace("persona = \"bookkeeper\"", "persona = \"a b\""));
    assert!(e.contains("persona `a b`"), "{e}");
}

#[test]
fn a_step_may_name_the_node_or_tag_it_runs_on_and_its_undo_follows() {
    let text = SAGA.replace(
        "verify = { status_in = [201] }\ncompensate",
        "on_tag = \"location=vps\"\nverify = { status_in = [201] }\ncompensate",
    );
    let pb = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let (steps, _) = pb
        .plan("T1", &json!({"url": "http://crm"}), &Value::Null)
        .unwrap_or_else(|e| panic!("{e}"));
    let at_vps = Some(Placement::Tag("location".into(), "vps".into()));
    assert_eq!(steps[0].placement, at_vps);
    assert_eq!(
        steps[0]
            .compensate
            .as_ref()
            .and_then(|u| u.placement.clone()),
        at_vps
    );

    let both = SAGA.replace(
        "verify = { status_in = [201] }\ncompensate",
        "on_node = \"vps\"\non_tag = \"a=b\"\nverify = { status_in = [201] }\ncompensate",
    );
    assert!(err(&both).contains("set `on_node` or `on_tag`, not both"));
    let bad = SAGA.replace(
        "verify = { status_in = [201] }\ncompensate",
        "on_tag = \"vps\"\nverify = { status_in = [201] }\ncompensate",
    );
    assert!(err(&bad).contains("on_tag `vps` must look like `location=laptop`"));
}

#[test]
fn templates_read_the_persona_and_name_its_fields() {
    let text = r#"
name = "welcome"
[[steps]]
id = "mail"
tool = "file.write"
params = { path = "/r/{{input.client}}.txt", content = "Dear {{input.client}},\n-- {{persona.signature}} ({{persona.contacts.email}})" }
verify = { file_exists = true }
"#;
    let pb = Playbook::parse(text, Path::new("welcome.toml"), &defaults())
        .unwrap_or_else(|e| panic!("{e}"));
    let persona = serde_json::json!({"name": "Ada", "signature": "Ada, Moreau Consulting",
                                     "contacts": {"email": "ada@example.com"}});
    let (steps, _) = pb
        .plan("t1", &serde_json::json!({"client": "acme"}), &persona)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        steps[0].params.to_value().unwrap_or_default()["content"],
        "Dear acme,\n-- Ada, Moreau Consulting (ada@example.com)"
    );
    // Without a persona file, the plan says what is missing.
    let Err(e) = pb.plan("t1", &serde_json::json!({"client": "acme"}), &Value::Null) else {
        panic!("planned without a persona");
    };
    assert!(e.to_string().contains("persona.signature"), "{e}");
    // A misspelt field is caught when the playbook loads.
    let Err(e) = Playbook::parse(
        &text.replace("persona.signature", "persona.signatur"),
        Path::new("welcome.toml"),
        &defaults(),
    ) else {
        panic!("loaded");
    };
    assert!(e.to_string().contains("persona has name, business"), "{e}");
}

#[test]
fn knowledge_templates_are_checked_at_load() {
    let base = r#"
name = "k"
[[steps]]
id = "a"
tool = "file.write"
params = { path = "/r/x", content = "{{context.pref.tone}} {{recall.text}}" }
verify = { file_exists = true }
"#;
    let Err(e) = parse(base) else {
        panic!("recall without [recall] loads")
    };
    assert!(e.to_string().contains("no [recall] section"), "{e}");
    let with_recall = format!("{base}[recall]\nquery = \"{{{{input.client}}}}\"\ntop_k = 3\n");
    let pb = parse(&with_recall).unwrap();
    assert_eq!(pb.context_paths(), ["pref.tone"]);
    // Planned with what the Planner gathered; at intake (nothing gathered) they stay.
    let known = Known {
        context: Some(json!({"pref": {"tone": "warm"}})),
        recall: Some(json!({"text": "- a fact"})),
    };
    let (steps, _) = pb
        .plan_with("t", &json!({"client": "acme"}), &Value::Null, &known)
        .unwrap();
    assert_eq!(
        steps[0].params.to_value().unwrap()["content"],
        "warm - a fact"
    );
    let (steps, _) = pb
        .plan("t", &json!({"client": "acme"}), &Value::Null)
        .unwrap();
    assert_eq!(
        steps[0].params.to_value().unwrap()["content"],
        "{{context.pref.tone}} {{recall.text}}"
    );
    let (query, bounds) = pb
        .recall_query("t", &json!({"client": "acme"}), &Value::Null)
        .unwrap()
        .unwrap();
    assert_eq!((query.as_str(), bounds.top_k), ("acme", 3));

    for (text, problem) in [
        (
            base.replace("{{recall.text}}", "{{context.client.x}}"),
            "start with a namespace",
        ),
        (
            format!(
                "{}\n[[remember]]\ntopic = \"t\"\ntext = \"{{{{context.pref.tone}}}}\"\n",
                base.replace(" {{recall.text}}", "")
            ),
            "what to remember reads",
        ),
        (
            format!(
                "{}\n[[remember]]\ntopic = \"t\"\ntext = \"x\"\nconfidence = 2.0\n",
                base.replace(" {{recall.text}}", "")
            ),
            "confidence 2",
        ),
        (
            format!(
                "{}\n[[steps]]\nid = \"b\"\ntool = \"file.write\"\ndepends_on = [\"a\"]\nparams = {{ path = \"/r/y\", content = \"{{{{steps.a.output.path}}}} {{{{context.pref.tone}}}}\" }}\nverify = {{ file_exists = true }}\n",
                base.replace(" {{recall.text}}", "")
            ),
            "may read input.* and task.* only",
        ),
    ] {
        let Err(e) = parse(&text) else {
            panic!("loaded: {text}")
        };
        assert!(e.to_string().contains(problem), "{e}");
    }
}

#[test]
fn a_goal_playbook_has_a_template_and_routing_instead_of_steps() {
    let pb = parse(
        r#"
name = "newsletter-goal"
goal = "Draft the newsletter about {{input.topic}} for {{persona.name}}"
[llm]
planner_model = "big"
executor_model = "small"
tools = ["llm.generate", "file.write"]
"#,
    )
    .unwrap();
    assert_eq!(pb.step_count(), 0);
    assert_eq!(pb.llm.executor_model, "small");
    let persona = serde_json::json!({"name": "Ada"});
    assert_eq!(
        pb.goal_text("t", &serde_json::json!({"topic": "pricing"}), &persona)
            .unwrap()
            .as_deref(),
        Some("Draft the newsletter about pricing for Ada")
    );
    assert!(
        pb.goal_text("t", &serde_json::json!({}), &persona).is_err(),
        "a missing input field is the submitter's error"
    );
    let both = format!("goal = \"x\"\n{OK}");
    assert!(
        err(&both).contains("has a `goal` and [[steps]]"),
        "{}",
        err(&both)
    );
    assert!(err("name = \"g\"\ngoal = \"{{steps.a.output.x}}\"").contains("a goal reads input.*"));
    assert!(
        err("name = \"g\"\ngoal = \"x\"\n[llm]\ntools = [\"mail.send\"]")
            .contains("unknown tool `mail.send`")
    );
    assert!(
        err("name = \"goal\"\ngoal = \"x\"")
            .contains("reserved for tasks submitted as a free-text goal")
    );
}

#[test]
fn a_judge_needs_a_rubric_a_threshold_in_range_and_a_step() {
    let step = |verify: &str| {
        format!(
            "name = \"j\"\n[[steps]]\nid = \"a\"\ntool = \"llm.generate\"\nparams = {{ prompt = \"p\" }}\nverify = {verify}\n"
        )
    };
    let pb = parse(&step(
        "{ llm_judge = { rubric = \"warm, in {{persona.voice}}\" } }",
    ))
    .unwrap();
    let (steps, _) = pb
        .plan(
            "t",
            &serde_json::json!({}),
            &serde_json::json!({"voice": "plain words"}),
        )
        .unwrap();
    let judge = steps[0].verify.llm_judge.clone().unwrap();
    assert_eq!(judge.rubric, "warm, in plain words");
    assert_eq!(judge.threshold, crate::model::Judge::DEFAULT_THRESHOLD);
    assert!(err(&step("{ llm_judge = { rubric = \"\" } }")).contains("needs a `rubric`"));
    assert!(
        err(&step("{ llm_judge = { rubric = \"r\", threshold = 1.5 } }"))
            .contains("must be between 0 and 1")
    );
    let in_checks = format!(
        "{}[[checks]]\nstep = \"a\"\nverify = {{ llm_judge = {{ rubric = \"r\" }} }}\n",
        step("{ output_contains = \"x\" }")
    );
    assert!(err(&in_checks).contains("put it in the step's `verify`"));
}

#[test]
fn an_llm_plan_is_checked_like_a_playbook() {
    let plan = serde_json::json!({"steps": [
        {"id": "draft", "tool": "llm.generate", "params": {"prompt": "Hi {{input.client}}", "model": null},
         "verify": {"output_contains": "Hi"}},
        {"id": "save", "tool": "file.write", "depends_on": ["draft"],
         "params": {"path": "/r/x.md", "content": "{{steps.draft.output.text}}"},
         "verify": {"file_exists": true}},
    ]});
    let pb = Playbook::from_plan("goal", "operator", &plan, &defaults()).unwrap();
    let (steps, _) = pb
        .plan("t", &serde_json::json!({"client": "Acme"}), &Value::Null)
        .unwrap();
    assert_eq!(steps[0].params.to_value().unwrap()["prompt"], "Hi Acme");
    assert!(steps[1].params_template.is_some(), "rendered at dispatch");
    assert_eq!(pb.persona, "operator");

    let mut no_dep = plan.clone();
    no_dep["steps"][1]["depends_on"] = serde_json::json!([]);
    let e = Playbook::from_plan("goal", "operator", &no_dep, &defaults()).unwrap_err();
    assert!(
        e.contains("step `save`") && e.contains("must be in depends_on"),
        "{e}"
    );
    let mut extra = plan.clone();
    extra["steps"][0]["why"] = serde_json::json!("because");
    let e = Playbook::from_plan("goal", "operator", &extra, &defaults()).unwrap_err();
    assert!(
        e.contains("steps[0]") && e.contains("unknown field `why`"),
        "{e}"
    );
    let e =
        Playbook::from_plan("goal", "operator", &serde_json::json!({}), &defaults()).unwrap_err();
    assert_eq!(e, "the plan has no `steps` array");
}

#[test]
fn a_wait_step_and_a_schedule_are_checked_when_loaded() {
    let wait = |params: &str, extra: &str| {
        format!(
            "name = \"w\"\n[[steps]]\nid = \"a\"\ntool = \"file.write\"\nparams = {{ path = \"/x\", content = \"\" }}\nverify = {{ file_exists = true }}\n[[steps]]\nid = \"p\"\ntool = \"wait\"\ndepends_on = [\"a\"]\nparams = {params}\n{extra}"
        )
    };
    assert!(parse(&wait("{ for = \"3d\" }", "")).is_ok());
    assert!(parse(&wait("{ until = \"{{input.when}}\" }", "")).is_ok());
    assert!(err(&wait("{ for = \"soon\" }", "")).contains("must start with a whole number"));
    assert!(err(&wait("{}", "")).contains("give `for`"));
    assert!(
        err(&wait("{ for = \"{{steps.a.output.bytes}}\" }", "")).contains("a `wait` step reads")
    );
    assert!(
        err(&wait("{ for = \"1s\" }", "verify = { file_exists = true }"))
            .contains("has no `verify`")
    );
    let scheduled = "name = \"s\"\n[schedule]\ncron = \"0 9 * * MON\"\ntz = \"Europe/London\"\nmissed = \"skip\"\ninput = { topic = \"pricing\" }\n[[steps]]\nid = \"p\"\ntool = \"wait\"\nparams = { for = \"0s\" }\n";
    let pb = parse(scheduled).unwrap();
    let rule = pb.schedule.unwrap();
    assert_eq!(rule.missed, crate::protocol::Missed::Skip);
    assert_eq!(rule.input, serde_json::json!({"topic": "pricing"}));
    let bad_tz = scheduled.replace("Europe/London", "Europe/Atlantis");
    assert!(err(&bad_tz).contains("schedule: time zone `Europe/Atlantis`"));
}

/// The intake checks a submission by looking up what the plan's templates read instead
/// of rendering the plan: for the shipped playbooks, a compensation and a persona, with
/// each input field left out, null, an object or an array in turn, with and without a
/// persona, and for input that is not an object, it says exactly what planning says.
#[test]
fn checking_input_says_what_planning_says() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../playbooks");
    let catalog = Catalog::load_dir(&dir, &defaults()).unwrap_or_else(|e| panic!("{e:?}"));
    let mut books: Vec<Playbook> = catalog
        .names()
        .iter()
        .filter_map(|n| catalog.get(n).map(|pb| Playbook::clone(pb)))
        .collect();
    assert!(books.len() >= 2, "the shipped playbooks");
    books.push(parse(SAGA).unwrap_or_else(|e| panic!("{e}")));
    books.push(
        parse(
            r#"
name = "welcome"
[[steps]]
id = "mail"
tool = "file.write"
params = { path = "/r/{{input.client}}/{{task.id}}.txt", content = "{{input.greeting}} -- {{persona.signature}}" }
verify = { file_contains = "{{input.client}}" }
"#,
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let personas = [Value::Null, json!({"signature": "Ada"})];
    for pb in &books {
        let refs = pb.submit_refs.as_ref().expect("references read at load");
        let fields: Vec<&str> = refs
            .iter()
            .filter_map(|(_, path)| path.strip_prefix("input."))
            .map(|rest| rest.split('.').next().unwrap_or_default())
            .collect();
        assert!(!fields.is_empty(), "{} reads its input", pb.name);
        let full: serde_json::Map<String, Value> =
            fields.iter().map(|f| (f.to_string(), json!("v"))).collect();
        let mut inputs = vec![
            Value::Object(full.clone()),
            json!({}),
            json!(["v"]),
            json!("v"),
        ];
        for f in &fields {
            for replacement in [None, Some(Value::Null), Some(json!({})), Some(json!(["v"]))] {
                let mut input = full.clone();
                match replacement {
                    None => input.remove(*f),
                    Some(v) => input.insert(f.to_string(), v),
                };
                inputs.push(Value::Object(input));
            }
        }
        for input in &inputs {
            for persona in &personas {
                assert_eq!(
                    pb.check_input(input, persona),
                    pb.plan("validation", input, persona).map(|_| ()),
                    "{}: input {input}, persona {persona}",
                    pb.name
                );
            }
        }
    }
}
