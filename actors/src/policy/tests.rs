use super::*;

fn facts(tool: &str) -> StepFacts {
    StepFacts {
        persona: "operator".into(),
        task_id: "T1".into(),
        step_id: "s1".into(),
        playbook: "pb".into(),
        tool: tool.into(),
        node: "laptop".into(),
        // 2026-11-24 (a Tuesday) 14:05 UTC.
        now_ms: 1_795_529_100_000,
        ..StepFacts::default()
    }
}

fn http(method: &str, host: &str) -> StepFacts {
    StepFacts {
        method: method.into(),
        host: host.into(),
        path: "/clients".into(),
        ..facts("http.request")
    }
}

fn one(text: &str) -> Result<Policies, Vec<PolicyError>> {
    Policies::from_sources(&[("test.cedar".into(), text.into())])
}

#[test]
fn the_defaults_gate_shell_writes_and_non_get_http() {
    let p = Policies::builtin();
    assert_eq!(
        p.decide(&http("GET", "api.example.com")).ruling,
        Ruling::Allow
    );
    assert_eq!(p.decide(&http("POST", "127.0.0.1")).ruling, Ruling::Allow);
    let post = p.decide(&http("POST", "api.example.com"));
    assert_eq!(post.ruling, Ruling::RequireApproval);
    assert_eq!(
        post.reasons,
        ["HTTP method other than GET to a host not on the allow list"]
    );
    assert_eq!(post.policy_version, p.version());
    let shell = p.decide(&StepFacts {
        program: "echo".into(),
        ..facts("shell.run")
    });
    assert_eq!(shell.ruling, Ruling::RequireApproval);
    assert_eq!(shell.reasons, ["shell.run needs an operator's approval"]);
    let inside = StepFacts {
        path: "/srv/clients/a.md".into(),
        within_roots: true,
        ..facts("file.write")
    };
    assert_eq!(p.decide(&inside).ruling, Ruling::Allow);
    let outside = p.decide(&StepFacts {
        within_roots: false,
        ..inside
    });
    assert_eq!(outside.ruling, Ruling::Deny);
    assert_eq!(
        outside.reasons,
        ["file.write outside the configured file roots"]
    );
    let context = |key: &str| StepFacts {
        path: key.into(),
        ..facts("context.put")
    };
    assert_eq!(
        p.decide(&context("project.acme.status")).ruling,
        Ruling::Allow
    );
    let safety = p.decide(&context("safety.no_mail_after_hours"));
    assert_eq!(safety.ruling, Ruling::RequireApproval);
    assert_eq!(
        safety.reasons,
        ["context.put to a safety.* key needs an operator's approval"]
    );
}

#[test]
fn the_context_is_exactly_the_schemas() {
    // Built directly at run time; here it must also pass the schema's validation, for
    // both actions (a missing or mistyped attribute would make policies error).
    let schema = Schema::from_str(SCHEMA).unwrap_or_else(|e| panic!("{e:?}"));
    for action in ["run", "run_unattended"] {
        let action = uid("Action", action);
        let context =
            Context::from_pairs(http("POST", "h").context(None)).unwrap_or_else(|e| panic!("{e}"));
        Request::new(
            uid("Persona", "operator"),
            action,
            uid("Step", "T1/s1"),
            context,
            Some(&schema),
        )
        .unwrap_or_else(|e| panic!("the context does not match the schema: {e}"));
    }
}

#[test]
fn nothing_runs_without_a_permit() {
    let p = one(r#"forbid (principal, action, resource) when { context.tool == "x" };"#)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let d = p.decide(&facts("file.write"));
    assert_eq!(d.ruling, Ruling::Deny);
    assert_eq!(d.reasons, ["no policy permits it"]);
}

#[test]
fn time_of_day_cost_and_persona_are_inputs() {
    let p = one(r#"
        permit (principal, action, resource);
        @id("night") @reason("no deploys at night")
        forbid (principal, action, resource) when { context.hour < 7 };
        @id("pricey")
        forbid (principal, action == Action::"run_unattended", resource)
        when { context.cost_micros > 50000 };
        @id("intern")
        forbid (principal == Persona::"intern", action == Action::"run_unattended", resource);
        "#)
    .unwrap_or_else(|e| panic!("{e:?}"));
    let day = facts("http.request");
    assert_eq!(p.decide(&day).ruling, Ruling::Allow);
    let night = StepFacts {
        // 03:00 UTC the same day.
        now_ms: day.now_ms - 11 * 3_600_000 - 5 * 60_000,
        ..day.clone()
    };
    let d = p.decide(&night);
    assert_eq!(
        (d.ruling, d.reasons),
        (Ruling::Deny, vec!["no deploys at night".into()])
    );
    let pricey = StepFacts {
        cost_micros: 60_000,
        ..day.clone()
    };
    let d = p.decide(&pricey);
    assert_eq!(
        (d.ruling, d.reasons),
        (Ruling::RequireApproval, vec!["pricey".into()])
    );
    let intern = StepFacts {
        persona: "intern".into(),
        ..day
    };
    assert_eq!(p.decide(&intern).ruling, Ruling::RequireApproval);
}

#[test]
fn errors_point_at_the_line() {
    let text = "permit (principal, action, resource);\n\nforbid (principal, action, resource)\nwhen { context.tol == \"x\" };\n";
    let errors = one(text).expect_err("typo in an attribute");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!((errors[0].file.as_str(), errors[0].line), ("test.cedar", 4));
    assert!(errors[0].message.contains("tol"), "{}", errors[0]);

    let errors = one("permit (principal, action, resource);\nforbid (principal action, resource);")
        .expect_err("syntax error");
    assert_eq!(errors[0].line, 2, "{errors:?}");
    assert!(
        errors[0].to_string().starts_with("test.cedar:2:"),
        "{}",
        errors[0]
    );
}

#[test]
fn ids_are_unique_across_files() {
    let a = (
        "a.cedar".to_string(),
        "@id(\"x\") permit (principal, action, resource);".to_string(),
    );
    let b = (
        "b.cedar".to_string(),
        "\n@id(\"x\") permit (principal, action, resource);".to_string(),
    );
    let errors = Policies::from_sources(&[a, b]).expect_err("duplicate id");
    assert_eq!(
        (errors[0].file.as_str(), errors[0].line),
        ("b.cedar", 2),
        "{errors:?}"
    );
    assert!(errors[0].message.contains("a.cedar:1"), "{}", errors[0]);
}

#[test]
fn the_version_follows_the_content() {
    let a = one("permit (principal, action, resource);").unwrap_or_else(|e| panic!("{e:?}"));
    let b = one("permit (principal, action, resource); ").unwrap_or_else(|e| panic!("{e:?}"));
    let a2 = one("permit (principal, action, resource);").unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(a.version(), a2.version());
    assert_ne!(a.version(), b.version());
    assert_eq!(a.version().len(), 12);
}

#[test]
fn a_directory_loads_in_name_order_and_needs_a_policy() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let errors = Policies::load_dir(dir.path()).expect_err("empty dir");
    assert!(errors[0].message.contains("no *.cedar files"), "{errors:?}");
    std::fs::write(dir.path().join("10-base.cedar"), DEFAULT_POLICIES)
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("README.md"), "not a policy").unwrap_or_else(|e| panic!("{e}"));
    let p = Policies::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(p.files().len(), 1);
    assert_eq!(p.len(), 5);
}

#[test]
fn an_allowed_step_needs_one_question_only_when_the_set_makes_it_safe() {
    assert!(Policies::builtin().one_question_allows);
    let permit_all = "permit (principal, action, resource);\n";
    let shaped = |extra: &str| {
        one(&format!("{permit_all}{extra}"))
            .unwrap_or_else(|e| panic!("{e:?}"))
            .one_question_allows
    };
    assert!(shaped(
        r#"forbid (principal, action == Action::"run_unattended", resource) when { context.tool == "shell.run" };"#
    ));
    // A forbid on `run` alone: `run_unattended` may be permitted while `run` is not.
    assert!(!shaped(
        r#"forbid (principal, action == Action::"run", resource) when { context.tool == "shell.run" };"#
    ));
    assert!(!shaped(
        r#"forbid (principal, action in [Action::"run", Action::"run_unattended"], resource) when { context.tool == "x" };"#
    ));
    // A condition that tells the two questions apart.
    assert!(!shaped(
        r#"forbid (principal, action, resource) when { action == Action::"run" && context.tool == "shell.run" };"#
    ));
    // A permit for `run_unattended` alone.
    let p = one(r#"permit (principal, action == Action::"run_unattended", resource);"#)
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(!p.one_question_allows);
    assert_eq!(p.decide(&facts("file.write")).ruling, Ruling::Deny);
    // And with a forbid on `run` alone, the step is still denied, as the two questions say.
    let p = one(&format!(
        "{permit_all}{}",
        r#"forbid (principal, action == Action::"run", resource) when { context.tool == "shell.run" };"#
    ))
    .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(p.decide(&facts("shell.run")).ruling, Ruling::Deny);
}

/// Steps the built-in policies allow, deny or send for approval.
fn cases_for_the_defaults() -> Vec<StepFacts> {
    let mut cases = vec![
        facts("file.write"),
        StepFacts {
            within_roots: true,
            ..facts("file.write")
        },
        facts("shell.run"),
        facts("email.send"),
        StepFacts {
            path: "safety.stop".into(),
            ..facts("context.put")
        },
        StepFacts {
            path: "notes.x".into(),
            ..facts("context.put")
        },
    ];
    for method in ["GET", "POST", "DELETE"] {
        for host in ["localhost", "127.0.0.1", "api.example.com"] {
            cases.push(http(method, host));
        }
    }
    cases
}

#[test]
fn one_question_decides_as_two_for_the_defaults() {
    let mut p = Policies::builtin();
    let cases = cases_for_the_defaults();
    let one_question: Vec<Decision> = cases.iter().map(|f| p.decide(f)).collect();
    p.one_question_allows = false;
    let two_questions: Vec<Decision> = cases.iter().map(|f| p.decide(f)).collect();
    assert_eq!(one_question, two_questions);
    for ruling in [Ruling::Allow, Ruling::Deny, Ruling::RequireApproval] {
        assert!(
            two_questions.iter().any(|d| d.ruling == ruling),
            "the cases cover {ruling:?}"
        );
    }
}

#[test]
fn a_question_carries_only_the_context_attributes_the_policies_read() {
    let read = |text: &str| {
        one(text)
            .unwrap_or_else(|e| panic!("{e:?}"))
            .context_read
            .map(|r| r.into_iter().collect::<Vec<_>>())
    };
    let names = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(
        Policies::builtin()
            .context_read
            .map(|r| r.into_iter().collect::<Vec<_>>()),
        names(&["host", "method", "path", "tool", "within_roots"])
    );
    assert_eq!(read("permit (principal, action, resource);"), names(&[]));
    assert_eq!(
        read(
            r#"permit (principal, action, resource) when { context has hour && context.hour < 18 && resource == Step::"T1/s1" };"#
        ),
        names(&["hour"])
    );
    // A record literal's keys are names, even one spelled like an operator.
    assert_eq!(
        read(r#"permit (principal, action, resource) when { {".": context.minute}["."] > 0 };"#),
        names(&["minute"])
    );
    // `context` used whole: every attribute must be there.
    assert_eq!(
        read(r#"forbid (principal, action, resource) when { {"c": context}.c.tool == "x" };"#),
        None
    );
}

#[test]
fn a_pruned_context_decides_as_the_whole_one() {
    let sets = [
        Policies::builtin(),
        one(concat!(
            "permit (principal, action, resource) when { context.hour >= 9 };\n",
            r#"forbid (principal, action == Action::"run_unattended", resource) when { context has weekday && context.weekday > 5 };"#,
        ))
        .unwrap_or_else(|e| panic!("{e:?}")),
    ];
    let mut cases = cases_for_the_defaults();
    // For the second set: 04:05 on a Tuesday, and 14:05 on a Sunday.
    for now_ms in [
        1_795_529_100_000 - 10 * 3_600_000,
        1_795_529_100_000 + 5 * 86_400_000,
    ] {
        cases.push(StepFacts {
            now_ms,
            ..facts("file.write")
        });
    }
    for mut p in sets {
        assert!(p.context_read.is_some());
        let pruned: Vec<Decision> = cases.iter().map(|f| p.decide(f)).collect();
        p.context_read = None;
        let whole: Vec<Decision> = cases.iter().map(|f| p.decide(f)).collect();
        assert_eq!(pruned, whole);
        assert!(
            whole.iter().any(|d| d.ruling != Ruling::Allow),
            "some case is not allowed"
        );
    }
}
