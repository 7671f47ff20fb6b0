use serde_json::json;

use super::{
    Inbound, MAX_SERVER_ID, MAX_SERVER_REQUESTS, MAX_TASKS, MAX_TASKS_PER_CALLER, Mux, Refused,
};

#[test]
fn two_clients_with_the_same_id_each_get_their_own_answer() {
    let mut m = Mux::new();
    let (a, to_child_a) = m
        .request(1, json!({"jsonrpc":"2.0","id":7,"method":"tools/call"}))
        .unwrap();
    let (b, to_child_b) = m
        .request(2, json!({"jsonrpc":"2.0","id":7,"method":"tools/call"}))
        .unwrap();
    assert_ne!(to_child_a["id"], to_child_b["id"]);
    // The child answers b first.
    let got = m.inbound(json!({"jsonrpc":"2.0","id":to_child_b["id"],"result":{"v":"b"}}));
    assert_eq!(
        got,
        Inbound::Done {
            call: b,
            message: json!({"jsonrpc":"2.0","id":7,"result":{"v":"b"}})
        }
    );
    let got = m.inbound(json!({"jsonrpc":"2.0","id":to_child_a["id"],"result":{"v":"a"}}));
    assert_eq!(
        got,
        Inbound::Done {
            call: a,
            message: json!({"jsonrpc":"2.0","id":7,"result":{"v":"a"}})
        }
    );
    assert_eq!(m.in_flight(), 0);
    // A second answer to the same id reaches nobody.
    assert!(matches!(
        m.inbound(json!({"jsonrpc":"2.0","id":to_child_a["id"],"result":{}})),
        Inbound::Drop(_)
    ));
}

#[test]
fn progress_reaches_the_client_that_asked_under_its_own_token() {
    let mut m = Mux::new();
    let (a, ca) = m
        .request(
            1,
            json!({"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"_meta":{"progressToken":"same"}}}),
        )
        .unwrap();
    let (b, cb) = m
        .request(
            2,
            json!({"jsonrpc":"2.0","id":"y","method":"tools/call","params":{"_meta":{"progressToken":"same"}}}),
        )
        .unwrap();
    let ta = ca["params"]["_meta"]["progressToken"].clone();
    let tb = cb["params"]["_meta"]["progressToken"].clone();
    assert_ne!(ta, tb);
    let got = m.inbound(json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":tb,"progress":1}}));
    assert_eq!(
        got,
        Inbound::Event {
            call: b,
            message: json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"same","progress":1}})
        }
    );
    m.forget(a);
    assert!(matches!(
        m.inbound(json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":ta,"progress":1}})),
        Inbound::Drop(_)
    ));
}

#[test]
fn a_client_cancels_only_its_own_request() {
    let mut m = Mux::new();
    let (_, ca) = m
        .request(1, json!({"jsonrpc":"2.0","id":5,"method":"tools/call"}))
        .unwrap();
    let cancel =
        json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":5}});
    let out = m.notification(1, cancel.clone()).unwrap();
    assert_eq!(out["params"]["requestId"], ca["id"]);
    // Caller 2 has no request 5: nothing reaches the child.
    assert_eq!(m.notification(2, cancel), None);
    // The client's initialized notification is the gateway's business.
    assert_eq!(
        m.notification(
            1,
            json!({"jsonrpc":"2.0","method":"notifications/initialized"})
        ),
        None
    );
}

/// Two clients the caller cannot tell apart (one caller) both send id 1: a cancellation of 1
/// reaches neither, and each one's end leaves the other's call as it was; once one is left,
/// its cancellation is its own again.
#[test]
fn a_cancellation_that_could_mean_two_calls_reaches_neither() {
    let mut m = Mux::new();
    let (a, _) = m
        .request(1, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    let (b, to_child_b) = m
        .request(1, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    let cancel =
        json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}});
    assert_eq!(m.notification(1, cancel.clone()), None);
    // a ends (its client left): b's call is still known by its id.
    assert_eq!(m.forget(a), Some(1));
    let out = m.notification(1, cancel.clone()).unwrap();
    assert_eq!(out["params"]["requestId"], to_child_b["id"]);
    assert_eq!(m.forget(b), Some(1));
    assert_eq!(m.notification(1, cancel), None);
}

/// A child that asks without end holds a bounded number of ids, each bounded in size; the
/// rest are refused to it.
#[test]
fn requests_from_the_child_are_bounded_in_number_and_size() {
    let mut m = Mux::for_one_caller();
    m.request(9, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    let long = "x".repeat(MAX_SERVER_ID);
    let got = m.inbound(json!({"jsonrpc":"2.0","id":long,"method":"roots/list"}));
    let Inbound::Reply(r) = got else {
        panic!("{got:?}")
    };
    assert_eq!(
        (r["id"].as_str(), &r["error"]["code"]),
        (Some(&*long), &json!(-32603))
    );
    for n in 0..MAX_SERVER_REQUESTS {
        let got = m.inbound(json!({"jsonrpc":"2.0","id":n,"method":"roots/list"}));
        assert!(matches!(got, Inbound::Event { .. }), "{n}: {got:?}");
    }
    let got = m.inbound(json!({"jsonrpc":"2.0","id":"one more","method":"roots/list"}));
    let Inbound::Reply(r) = got else {
        panic!("{got:?}")
    };
    assert_eq!(r["id"], "one more");
}

#[test]
fn a_server_request_goes_to_the_one_client_in_flight_and_its_answer_back() {
    let mut m = Mux::new();
    let (a, _) = m
        .request(9, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    let got =
        m.inbound(json!({"jsonrpc":"2.0","id":"s1","method":"sampling/createMessage","params":{}}));
    let Inbound::Event { call, message } = got else {
        panic!("not routed: {got:?}")
    };
    assert_eq!(call, a);
    let ours = message["id"].clone();
    // Another client cannot answer it.
    assert_eq!(
        m.response(8, json!({"jsonrpc":"2.0","id":ours,"result":{}})),
        Err(Refused::Malformed("an answer to no request of the server"))
    );
    let back = m
        .response(9, json!({"jsonrpc":"2.0","id":ours,"result":{"ok":true}}))
        .unwrap();
    assert_eq!(
        back,
        json!({"jsonrpc":"2.0","id":"s1","result":{"ok":true}})
    );
    // Answered once only.
    assert!(
        m.response(9, json!({"jsonrpc":"2.0","id":ours,"result":{}}))
            .is_err()
    );
}

#[test]
fn a_server_request_with_several_clients_in_flight_is_refused_to_the_child() {
    let mut m = Mux::new();
    m.request(1, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    m.request(2, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    let got = m.inbound(json!({"jsonrpc":"2.0","id":3,"method":"elicitation/create"}));
    let Inbound::Reply(r) = got else {
        panic!("{got:?}")
    };
    assert_eq!(r["id"], 3);
    assert_eq!(r["error"]["code"], -32603);
}

#[test]
fn list_changes_and_logs_are_not_delivered_to_a_client() {
    let mut m = Mux::new();
    assert_eq!(
        m.inbound(json!({"jsonrpc":"2.0","method":"notifications/tools/list_changed"})),
        Inbound::ListChanged("notifications/tools/list_changed".into())
    );
    assert!(matches!(
        m.inbound(json!({"jsonrpc":"2.0","method":"notifications/message","params":{}})),
        Inbound::Drop(_)
    ));
    assert!(matches!(m.inbound(json!([1, 2])), Inbound::Drop(_)));
    assert!(matches!(
        m.inbound(json!({"id": "nope", "result": 1})),
        Inbound::Drop(_)
    ));
}

#[test]
fn requests_without_an_id_or_method_are_refused() {
    let mut m = Mux::new();
    assert!(m.request(1, json!({"jsonrpc":"2.0","method":"x"})).is_err());
    assert!(m.request(1, json!({"jsonrpc":"2.0","id":1})).is_err());
    assert!(m.request(1, json!("x")).is_err());
}

#[test]
fn the_2026_envelope_is_taken_off_what_the_child_sees() {
    let mut m = Mux::new();
    let (_, out) = m
        .request(
            1,
            json!({"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{
                "io.modelcontextprotocol/protocolVersion":"2026-07-28",
                "io.modelcontextprotocol/clientInfo":{"name":"c"},
                "traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}}}),
        )
        .unwrap();
    assert_eq!(
        out["params"]["_meta"],
        json!({"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    );
    let (_, out) = m
        .request(
            1,
            json!({"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}),
        )
        .unwrap();
    assert_eq!(out["params"], json!({}));
}

/// The child's answer to `to_child` that creates the task `task` (2025-11-25 shape).
fn task_created(m: &mut Mux, to_child: &serde_json::Value, task: &str) -> Inbound {
    m.inbound(json!({"jsonrpc":"2.0","id":to_child["id"],"result":{"task":{"taskId":task,"status":"working"}}}))
}

#[test]
fn a_task_is_its_creators_alone() {
    let mut m = Mux::new();
    let (_, out) = m
        .request(
            1,
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"slow","task":{"ttl":60000}}}),
        )
        .unwrap();
    assert!(matches!(
        task_created(&mut m, &out, "t-1"),
        Inbound::Done { .. }
    ));
    for method in ["tasks/get", "tasks/result", "tasks/cancel"] {
        let ask = json!({"jsonrpc":"2.0","id":2,"method":method,"params":{"taskId":"t-1"}});
        // Another caller (another tenant or agent sharing the child) cannot name it.
        assert_eq!(m.request(2, ask.clone()).err(), Some(Refused::UnknownTask));
        // Its creator can, and the child sees the task's own id.
        let (call, out) = m.request(1, ask).unwrap();
        assert_eq!(out["params"]["taskId"], "t-1");
        m.forget(call);
    }
    // A task the child never created for anyone, and a taskId that is not a string.
    for task in [json!("t-2"), json!(1), json!(null)] {
        let ask = json!({"jsonrpc":"2.0","id":3,"method":"tasks/get","params":{"taskId":task}});
        assert_eq!(m.request(1, ask).err(), Some(Refused::UnknownTask));
    }
    assert_eq!(
        m.request(1, json!({"jsonrpc":"2.0","id":3,"method":"tasks/get"}))
            .err(),
        Some(Refused::UnknownTask)
    );

    // The 2026-07-28 extension's shape is read too.
    let (_, out) = m
        .request(
            2,
            json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"slow","task":{}}}),
        )
        .unwrap();
    m.inbound(
        json!({"jsonrpc":"2.0","id":out["id"],"result":{"resultType":"task","taskId":"t-3"}}),
    );

    // tasks/list: each caller sees its own tasks only, whatever the child lists, and no cursor
    // of the child's (it may name another caller's task).
    for (caller, own) in [(1, "t-1"), (2, "t-3"), (3, "")] {
        let (call, out) = m
            .request(
                caller,
                json!({"jsonrpc":"2.0","id":5,"method":"tasks/list"}),
            )
            .unwrap();
        let got = m.inbound(json!({"jsonrpc":"2.0","id":out["id"],"result":{"tasks":[
            {"taskId":"t-1","status":"working"},{"taskId":"t-2"},{"taskId":"t-3"},{"status":"odd"}],
            "nextCursor":"c"}}));
        let expected: Vec<serde_json::Value> = [
            json!({"taskId":"t-1","status":"working"}),
            json!({"taskId":"t-3"}),
        ]
        .into_iter()
        .filter(|t| t["taskId"] == own)
        .collect();
        assert_eq!(
            got,
            Inbound::Done {
                call,
                message: json!({"jsonrpc":"2.0","id":5,"result":{"tasks":expected}})
            },
            "caller {caller}"
        );
    }
}

#[test]
fn only_the_last_tasks_are_remembered_and_no_caller_pushes_out_anothers() {
    let mut m = Mux::new();
    let create = |m: &mut Mux, caller: u64, task: &str| {
        let (_, out) = m
            .request(
                caller,
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"task":{}}}),
            )
            .unwrap();
        task_created(m, &out, task);
    };
    let get = |t: &str| json!({"jsonrpc":"2.0","id":0,"method":"tasks/get","params":{"taskId":t}});
    create(&mut m, 2, "theirs");
    for n in 0..=MAX_TASKS_PER_CALLER {
        create(&mut m, 1, &format!("t{n}"));
    }
    // Caller 1's oldest is nobody's any more; its newest, and caller 2's, are still theirs.
    assert_eq!(m.request(1, get("t0")).err(), Some(Refused::UnknownTask));
    assert!(
        m.request(1, get(&format!("t{MAX_TASKS_PER_CALLER}")))
            .is_ok()
    );
    assert!(m.request(1, get("t1")).is_ok());
    assert!(m.request(2, get("theirs")).is_ok());
    // Many callers, each with all it may hold: past MAX_TASKS in all, the caller holding the
    // most loses its oldest, and one with a single task keeps it however many others make.
    let heavy = (MAX_TASKS / MAX_TASKS_PER_CALLER) as u64 + 1;
    for c in 0..heavy {
        for n in 0..MAX_TASKS_PER_CALLER {
            create(&mut m, 100 + c, &format!("c{c}-{n}"));
        }
    }
    assert!(m.request(2, get("theirs")).is_ok());
    let newest = format!("c{}-{}", heavy - 1, MAX_TASKS_PER_CALLER - 1);
    assert!(m.request(100 + heavy - 1, get(&newest)).is_ok());
    // An id the child gives twice is nobody's; a new child's tasks start afresh.
    create(&mut m, 3, "dup");
    create(&mut m, 4, "dup");
    assert_eq!(m.request(3, get("dup")).err(), Some(Refused::UnknownTask));
    assert_eq!(m.request(4, get("dup")).err(), Some(Refused::UnknownTask));
    m.child_started();
    assert_eq!(
        m.request(100 + heavy - 1, get(&newest)).err(),
        Some(Refused::UnknownTask)
    );
}

/// A shared child is offered no roots: its `roots/list` reaches no client (an answer would set
/// the roots, for a filesystem server its allowed folders, for every caller), and a client's
/// notifications other than cancellations do not reach it. A child of one caller has both.
#[test]
fn a_shared_child_asks_no_client_for_roots_and_hears_only_cancellations() {
    let mut m = Mux::new();
    m.request(9, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    let got = m.inbound(json!({"jsonrpc":"2.0","id":"r","method":"roots/list"}));
    let Inbound::Reply(r) = got else {
        panic!("{got:?}")
    };
    assert_eq!(
        (&r["id"], &r["error"]["code"]),
        (&json!("r"), &json!(-32601))
    );
    for method in [
        "notifications/roots/list_changed",
        "notifications/progress",
        "notifications/message",
    ] {
        assert_eq!(
            m.notification(9, json!({"jsonrpc":"2.0","method":method,"params":{}})),
            None,
            "{method}"
        );
    }
    let cancel = m.notification(
        9,
        json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}),
    );
    assert!(cancel.is_some());

    let mut one = Mux::for_one_caller();
    one.request(9, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    let got = one.inbound(json!({"jsonrpc":"2.0","id":"r","method":"roots/list"}));
    assert!(matches!(got, Inbound::Event { .. }), "{got:?}");
    assert!(
        one.notification(
            9,
            json!({"jsonrpc":"2.0","method":"notifications/roots/list_changed"})
        )
        .is_some()
    );
}

/// A call that ended at the gateway (timed out, or its client left) may still run in a shared
/// child: while it may, the child's requests go to nobody (they could be that call's, and the
/// one client in flight a bystander). Its late answer, or the window's end, lifts that.
#[test]
fn after_an_abandoned_call_a_shared_childs_request_goes_to_nobody() {
    let sampling =
        |id: &str| json!({"jsonrpc":"2.0","id":id,"method":"sampling/createMessage","params":{}});
    let mut m = Mux::new();
    let (gone, _) = m
        .request(1, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    m.abandon(gone, std::time::Duration::from_secs(60));
    m.request(2, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    let got = m.inbound(sampling("s1"));
    let Inbound::Reply(r) = got else {
        panic!("went to the bystander: {got:?}")
    };
    assert_eq!(r["error"]["code"], -32603);
    // The child answers the abandoned call: the bystander is then the one in flight.
    assert!(matches!(
        m.inbound(json!({"jsonrpc":"2.0","id":gone,"result":{}})),
        Inbound::Drop(_)
    ));
    assert!(matches!(m.inbound(sampling("s2")), Inbound::Event { .. }));

    // Or the window ends.
    let mut m = Mux::new();
    let (gone, _) = m
        .request(1, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    // (A window long enough that a loaded host does not end it between the next two lines.)
    m.abandon(gone, std::time::Duration::from_millis(400));
    m.request(2, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    assert!(matches!(m.inbound(sampling("s1")), Inbound::Reply(_)));
    std::thread::sleep(std::time::Duration::from_millis(450));
    assert!(matches!(m.inbound(sampling("s2")), Inbound::Event { .. }));

    // A child of one caller asks only that caller anyway.
    let mut one = Mux::for_one_caller();
    let (gone, _) = one
        .request(1, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    one.abandon(gone, std::time::Duration::from_secs(60));
    one.request(1, json!({"jsonrpc":"2.0","id":2,"method":"tools/call"}))
        .unwrap();
    assert!(matches!(one.inbound(sampling("s1")), Inbound::Event { .. }));
}

/// A task's work goes on in a shared child after its call was answered: what it asks is for
/// the task's creator, not for whoever has a call in flight then.
#[test]
fn a_working_task_of_another_caller_keeps_a_shared_childs_requests_from_a_bystander() {
    let elicit = |id: &str, meta: serde_json::Value| json!({"jsonrpc":"2.0","id":id,"method":"elicitation/create","params":{"message":"which account?","_meta":meta}});
    // Caller 1's task-augmented call (`ask`: its `params.task`), answered with `answer`.
    let research = |m: &mut Mux, id: u64, ask: serde_json::Value, answer: serde_json::Value| {
        let (_, out) = m
            .request(
                1,
                json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"research","task":ask}}),
            )
            .unwrap();
        m.inbound(json!({"jsonrpc":"2.0","id":out["id"],"result":answer}));
    };
    let working = |task: &str| json!({"task":{"taskId":task,"status":"working"}});
    let mut m = Mux::new();
    research(&mut m, 1, json!({}), working("t-1"));
    // The bystander's call is the one in flight.
    let (bystander, _) = m
        .request(2, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
        .unwrap();
    for meta in [
        json!({}),
        json!({"io.modelcontextprotocol/related-task": {"taskId": "t-1"}}),
        json!({"io.modelcontextprotocol/related-task": {"taskId": "t-unknown"}}),
    ] {
        let got = m.inbound(elicit("e1", meta.clone()));
        let Inbound::Reply(r) = got else {
            panic!("reached the bystander ({meta}): {got:?}")
        };
        assert_eq!(r["error"]["code"], -32603);
    }
    m.forget(bystander);
    // The creator polls its task: a request naming the task goes to it.
    let (poll, out) = m
        .request(
            1,
            json!({"jsonrpc":"2.0","id":2,"method":"tasks/get","params":{"taskId":"t-1"}}),
        )
        .unwrap();
    let got = m.inbound(elicit(
        "e2",
        json!({"io.modelcontextprotocol/related-task": {"taskId": "t-1"}}),
    ));
    assert!(
        matches!(got, Inbound::Event { call, .. } if call == poll),
        "{got:?}"
    );
    // The task ends (its status, as the child answers the poll): the bystander is asked again.
    m.inbound(
        json!({"jsonrpc":"2.0","id":out["id"],"result":{"taskId":"t-1","status":"completed"}}),
    );
    m.request(2, json!({"jsonrpc":"2.0","id":3,"method":"tools/call"}))
        .unwrap();
    assert!(matches!(
        m.inbound(elicit("e3", json!({}))),
        Inbound::Event { .. }
    ));
    // So does a status notification.
    research(&mut m, 4, json!({}), working("t-2"));
    assert!(matches!(
        m.inbound(elicit("e4", json!({}))),
        Inbound::Reply(_)
    ));
    m.inbound(json!({"jsonrpc":"2.0","method":"notifications/tasks/status","params":{"taskId":"t-2","status":"failed"}}));
    assert!(matches!(
        m.inbound(elicit("e5", json!({}))),
        Inbound::Event { .. }
    ));
    // A task whose creating answer says it ended already is not working.
    research(
        &mut m,
        5,
        json!({}),
        json!({"task":{"taskId":"t-3","status":"completed"}}),
    );
    assert!(matches!(
        m.inbound(elicit("e6", json!({}))),
        Inbound::Event { .. }
    ));
    // A task nobody asks about again is taken to be working for its time to live at most (and
    // ten minutes): its creator cannot keep the child from asking the others for good.
    research(
        &mut m,
        6,
        json!({"ttl":400}),
        json!({"task":{"taskId":"t-4","status":"working","ttl":400}}),
    );
    assert!(matches!(
        m.inbound(elicit("e7", json!({}))),
        Inbound::Reply(_)
    ));
    std::thread::sleep(std::time::Duration::from_millis(450));
    assert!(matches!(
        m.inbound(elicit("e8", json!({}))),
        Inbound::Event { .. }
    ));
}

/// The ids the child sees (a call's, its progress token's) are random below 2^53, not counted
/// up: a caller cannot foretell another's to answer it from the child's stdout (a tool that
/// prints to it). Counted, the next call's id was the last one seen plus one.
#[test]
fn the_ids_a_child_sees_cannot_be_foretold() {
    let mut m = Mux::new();
    let mut ids = Vec::new();
    for i in 0..64 {
        let (call, out) = m
            .request(
                1,
                json!({"jsonrpc":"2.0","id":i,"method":"tools/call","params":{"_meta":{"progressToken":i}}}),
            )
            .unwrap();
        assert_eq!(out["id"], call);
        assert_eq!(out["params"]["_meta"]["progressToken"], format!("p{call}"));
        ids.push(call);
    }
    assert!(ids.iter().all(|id| *id > 0 && *id < 1 << 53), "{ids:?}");
    assert!(ids.windows(2).all(|w| w[1] != w[0] + 1), "{ids:?}");
    // 64 ids all below 2^40 would be one chance in 2^832.
    assert!(ids.iter().any(|id| *id >= 1 << 40), "{ids:?}");
}
