use super::*;

#[test]
fn a_name_unsafe_in_a_head_goes_base64() {
    assert_eq!(header_text("echo"), "echo");
    assert_eq!(header_text("a b"), "=?base64?YSBi?=");
    assert_eq!(header_text("x\r\ny"), "=?base64?eA0KeQ==?=");
    assert_eq!(
        header_text("=?base64?eA==?="),
        "=?base64?PT9iYXNlNjQ/ZUE9PT89?="
    );
}
