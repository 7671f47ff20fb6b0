//! Sealed federation session ids: opening any string never panics, and only what was sealed
//! with the key opens.
#![no_main]

use gateway::session;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = [7u8; 32];
    if let Ok(id) = std::str::from_utf8(data)
        && let Some(s) = session::open(&key, id)
    {
        // Whatever opens seals back to something that opens to the same members.
        let again = session::seal(&key, &s);
        let reopened = session::open(&key, &again).expect("a sealed id opens");
        assert_eq!(format!("{s:?}"), format!("{reopened:?}"));
    }
});
