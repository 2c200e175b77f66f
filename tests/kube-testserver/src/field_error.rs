//! Field errors as the apiserver reports them: `spec.ports[0].port: Invalid value: 0: must be
//! between 1 and 65535`, gathered into one `422 Invalid` `Status` with a cause per field.

use serde_json::{Value, json};

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldErrorKind {
    /// A required field is missing or empty (`FieldValueRequired`).
    Required,
    /// A required field is missing or empty, with why (`FieldValueRequired`).
    RequiredBecause(String),
    /// The value is not one of the allowed ones (`FieldValueNotSupported`).
    NotSupported(Vec<String>),
    /// The value is wrong, with why (`FieldValueInvalid`).
    Invalid(String),
    /// The value has the wrong JSON type, with why (`FieldValueTypeInvalid`).
    TypeInvalid(String),
    /// The field may not be set or changed, with why (`FieldValueForbidden`).
    Forbidden(String),
    /// A value repeats where it must be unique (`FieldValueDuplicate`).
    Duplicate,
    /// Too long a string (`FieldValueTooLong`), the maximum length.
    TooLong(usize),
    /// Too many items (`FieldValueTooMany`), the maximum count.
    TooMany(usize),
}

/// One invalid field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// The field's path, as the apiserver writes it: `spec.ports[0].port`, `metadata.labels`.
    pub field: String,
    /// What is wrong.
    pub kind: FieldErrorKind,
    /// The offending value, where the message shows it.
    pub value: Option<Value>,
}

impl FieldError {
    /// A missing required field.
    pub fn required(field: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Required,
            value: None,
        }
    }

    /// A missing required field, with why: `spec.x: Required value: must be specified`.
    pub fn required_because(field: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::RequiredBecause(why.into()),
            value: None,
        }
    }

    /// A wrong value.
    pub fn invalid(field: impl Into<String>, value: Value, why: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Invalid(why.into()),
            value: Some(value),
        }
    }

    /// A value of the wrong JSON type: `value` is what the message shows (for schema
    /// validation, the name of the JSON type that was found, as the apiserver shows it).
    pub fn type_invalid(field: impl Into<String>, value: Value, why: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::TypeInvalid(why.into()),
            value: Some(value),
        }
    }

    /// A value that repeats where it must be unique.
    pub fn duplicate(field: impl Into<String>, value: Value) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Duplicate,
            value: Some(value),
        }
    }

    /// A value longer than `max` bytes.
    pub fn too_long(field: impl Into<String>, max: usize) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::TooLong(max),
            value: None,
        }
    }

    /// More than `max` items.
    pub fn too_many(field: impl Into<String>, max: usize) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::TooMany(max),
            value: None,
        }
    }

    /// A value outside an enumeration.
    pub fn not_supported(field: impl Into<String>, value: Value, allowed: &[&str]) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::NotSupported(allowed.iter().map(|s| (*s).to_owned()).collect()),
            value: Some(value),
        }
    }

    /// A forbidden value or change.
    pub fn forbidden(field: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Forbidden(why.into()),
            value: None,
        }
    }

    /// A change to an immutable field.
    pub fn immutable(field: impl Into<String>, value: Value) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Invalid("field is immutable".into()),
            value: Some(value),
        }
    }

    /// The `Status` cause reason.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Required | FieldErrorKind::RequiredBecause(_) => "FieldValueRequired",
            FieldErrorKind::NotSupported(_) => "FieldValueNotSupported",
            FieldErrorKind::Invalid(_) => "FieldValueInvalid",
            FieldErrorKind::TypeInvalid(_) => "FieldValueTypeInvalid",
            FieldErrorKind::Forbidden(_) => "FieldValueForbidden",
            FieldErrorKind::Duplicate => "FieldValueDuplicate",
            FieldErrorKind::TooLong(_) => "FieldValueTooLong",
            FieldErrorKind::TooMany(_) => "FieldValueTooMany",
        }
    }

    fn shown_value(&self) -> String {
        match &self.value {
            Some(Value::String(s)) => format!("{s:?}"),
            Some(v) => v.to_string(),
            None => "null".into(),
        }
    }

    /// The detail without the field path: `Required value`, `Invalid value: 0: must be ...`.
    pub fn detail(&self) -> String {
        match &self.kind {
            FieldErrorKind::Required => "Required value".into(),
            FieldErrorKind::RequiredBecause(why) => format!("Required value: {why}"),
            FieldErrorKind::NotSupported(allowed) => {
                let list: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
                format!(
                    "Unsupported value: {}: supported values: {}",
                    self.shown_value(),
                    list.join(", ")
                )
            }
            FieldErrorKind::Invalid(why) | FieldErrorKind::TypeInvalid(why) => {
                format!("Invalid value: {}: {why}", self.shown_value())
            }
            FieldErrorKind::Forbidden(why) => format!("Forbidden: {why}"),
            FieldErrorKind::Duplicate => format!("Duplicate value: {}", self.shown_value()),
            FieldErrorKind::TooLong(max) => {
                format!("Too long: may not be more than {max} bytes")
            }
            FieldErrorKind::TooMany(max) => {
                format!("Too many: must have at most {max} items")
            }
        }
    }

    /// `field: detail`, as in the `Status` message.
    pub fn message(&self) -> String {
        format!("{}: {}", self.field, self.detail())
    }

    /// The `Status` cause object.
    pub fn cause(&self) -> Value {
        json!({"reason": self.reason(), "message": self.detail(), "field": self.field})
    }
}

/// The message of a `422 Invalid` for `kind "name"`: `Service "x" is invalid: [a, b]`.
pub fn invalid_message(kind: &str, name: &str, errors: &[FieldError]) -> String {
    let msgs: Vec<String> = errors.iter().map(FieldError::message).collect();
    match msgs.as_slice() {
        [one] => format!("{kind} \"{name}\" is invalid: {one}"),
        many => format!("{kind} \"{name}\" is invalid: [{}]", many.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_like_the_apiserver() {
        let e = FieldError::not_supported("spec.type", json!("Foo"), &["ClusterIP", "NodePort"]);
        assert_eq!(
            e.message(),
            "spec.type: Unsupported value: \"Foo\": supported values: \"ClusterIP\", \"NodePort\""
        );
        let r = FieldError::required("spec.containers");
        assert_eq!(
            invalid_message("Pod", "p", std::slice::from_ref(&r)),
            "Pod \"p\" is invalid: spec.containers: Required value"
        );
        let i = FieldError::immutable("spec.clusterIP", json!("10.0.0.2"));
        assert_eq!(
            invalid_message("Service", "s", &[r, i.clone()]),
            "Service \"s\" is invalid: [spec.containers: Required value, spec.clusterIP: Invalid value: \"10.0.0.2\": field is immutable]"
        );
        assert_eq!(i.cause()["reason"], "FieldValueInvalid");
    }
}
