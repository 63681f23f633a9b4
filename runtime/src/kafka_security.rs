//! How logic and job reach Kafka securely: TLS, SASL and their credentials,
//! one set of flags ([`KafkaSecurityArgs`], flattened into both roles) turned into one
//! list of librdkafka settings ([`KafkaSecurity::client_settings`]) that
//! every client of both roles (logic's producers, job's consumer and
//! dead-letter producer) applies. The crate holds no librdkafka: the roles
//! `set` each pair on their own `ClientConfig`.

use std::path::PathBuf;

use crate::contract;

/// librdkafka's `security.protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SecurityProtocol {
    /// No TLS, no authentication (the default).
    #[default]
    #[value(name = "PLAINTEXT")]
    Plaintext,
    /// TLS, no SASL.
    #[value(name = "SSL")]
    Ssl,
    /// SASL without TLS: credentials and records cross the network in the clear
    /// (SCRAM's exchange hides the password; PLAIN does not).
    #[value(name = "SASL_PLAINTEXT")]
    SaslPlaintext,
    /// SASL over TLS.
    #[value(name = "SASL_SSL")]
    SaslSsl,
}

impl SecurityProtocol {
    /// The value librdkafka takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether the connection is TLS.
    pub fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    /// Whether the client logs in with SASL.
    pub fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// librdkafka's `sasl.mechanism`: the ones that need no Kerberos or OAuth
/// set-up, a user name and a password.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    /// The password itself is sent: use it only over `SASL_SSL`.
    #[value(name = "PLAIN")]
    Plain,
    /// Salted challenge-response, SHA-256.
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    /// Salted challenge-response, SHA-512 (the default; Strimzi's too).
    #[default]
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The value librdkafka takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Kafka security flags, shared by logic and job.
#[derive(Clone, clap::Args)]
pub struct KafkaSecurityArgs {
    /// How clients talk to the brokers (the name in any case).
    #[arg(
        long,
        env = contract::KAFKA_SECURITY_PROTOCOL,
        value_enum,
        ignore_case = true,
        default_value = "PLAINTEXT"
    )]
    pub kafka_security_protocol: SecurityProtocol,
    /// SASL mechanism for the `SASL_*` protocols (the name in any case).
    #[arg(
        long,
        env = contract::KAFKA_SASL_MECHANISM,
        value_enum,
        ignore_case = true,
        default_value = "SCRAM-SHA-512"
    )]
    pub kafka_sasl_mechanism: SaslMechanism,
    /// SASL user name (required by the `SASL_*` protocols).
    #[arg(long, env = contract::KAFKA_USERNAME)]
    pub kafka_username: Option<String>,
    /// SASL password (required by the `SASL_*` protocols); best given by
    /// its environment variable, from a Secret.
    #[arg(long, env = contract::KAFKA_PASSWORD, hide_env_values = true)]
    pub kafka_password: Option<String>,
    /// PEM file of the CA(s) that sign the brokers' certificates, for `SSL`
    /// and `SASL_SSL`; without it the system's trusted CAs are used.
    #[arg(long, env = contract::KAFKA_CA_FILE)]
    pub kafka_ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for KafkaSecurityArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.clone().security().fmt(f)
    }
}

impl KafkaSecurityArgs {
    /// The settings these flags say, unchecked ([`KafkaSecurity::validate`]).
    pub fn security(self) -> KafkaSecurity {
        let KafkaSecurityArgs {
            kafka_security_protocol,
            kafka_sasl_mechanism,
            kafka_username,
            kafka_password,
            kafka_ca_file,
        } = self;
        KafkaSecurity {
            protocol: kafka_security_protocol,
            mechanism: kafka_sasl_mechanism,
            username: kafka_username.filter(|u| !u.is_empty()),
            password: kafka_password.filter(|p| !p.is_empty()),
            ca_file: kafka_ca_file.filter(|p| !p.as_os_str().is_empty()),
        }
    }
}

/// TLS and SASL settings for every Kafka client of a role.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaSecurity {
    /// `security.protocol`.
    pub protocol: SecurityProtocol,
    /// `sasl.mechanism` (SASL protocols only).
    pub mechanism: SaslMechanism,
    /// `sasl.username`.
    pub username: Option<String>,
    /// `sasl.password`.
    pub password: Option<String>,
    /// `ssl.ca.location` (TLS protocols only).
    pub ca_file: Option<PathBuf>,
}

/// Never prints the password.
impl std::fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSecurity")
            .field("protocol", &self.protocol)
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl KafkaSecurity {
    /// Rejects combinations that cannot be what the operator meant: SASL
    /// without credentials, credentials or a CA file the protocol would
    /// silently ignore.
    ///
    /// # Errors
    /// The first problem, as a sentence naming the flags.
    pub fn validate(&self) -> Result<(), String> {
        let protocol = self.protocol;
        let name = protocol_name(protocol);
        if protocol.sasl() && (self.username.is_none() || self.password.is_none()) {
            return Err(format!(
                "--kafka-security-protocol {name} needs --kafka-username and --kafka-password \
                 ({} and {})",
                contract::KAFKA_USERNAME,
                contract::KAFKA_PASSWORD
            ));
        }
        if !protocol.sasl() && (self.username.is_some() || self.password.is_some()) {
            return Err(format!(
                "--kafka-username/--kafka-password are only used with \
                 --kafka-security-protocol SASL_PLAINTEXT or SASL_SSL, not {name}"
            ));
        }
        if !protocol.tls() && self.ca_file.is_some() {
            return Err(format!(
                "--kafka-ca-file is only used with --kafka-security-protocol SSL or SASL_SSL, \
                 not {name}"
            ));
        }
        Ok(())
    }

    /// The librdkafka settings, `(name, value)`, to `set` on every client
    /// config; none for `PLAINTEXT`. Broker host names are verified against
    /// their certificates (librdkafka's default, written out here).
    pub fn client_settings(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("security.protocol", self.protocol.as_str().to_owned())];
        if self.protocol.sasl() {
            out.push(("sasl.mechanism", self.mechanism.as_str().to_owned()));
            if let Some(username) = &self.username {
                out.push(("sasl.username", username.clone()));
            }
            if let Some(password) = &self.password {
                out.push(("sasl.password", password.clone()));
            }
        }
        if self.protocol.tls() {
            out.push(("ssl.endpoint.identification.algorithm", "https".to_owned()));
            if let Some(ca) = &self.ca_file {
                out.push(("ssl.ca.location", ca.display().to_string()));
            }
        }
        out
    }
}

fn protocol_name(protocol: SecurityProtocol) -> &'static str {
    match protocol {
        SecurityProtocol::Plaintext => "PLAINTEXT",
        SecurityProtocol::Ssl => "SSL",
        SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
        SecurityProtocol::SaslSsl => "SASL_SSL",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaSecurityArgs,
    }

    fn parse(argv: &[&str]) -> Result<KafkaSecurity, String> {
        use clap::Parser;
        let cli = Cli::try_parse_from(std::iter::once("t").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        let security = cli.kafka.security();
        security.validate()?;
        Ok(security)
    }

    #[test]
    fn plaintext_by_default_and_sets_only_the_protocol() {
        let s = parse(&[]).expect("defaults are valid");
        assert_eq!(s, KafkaSecurity::default());
        assert_eq!(
            s.client_settings(),
            vec![("security.protocol", "plaintext".to_owned())]
        );
    }

    #[test]
    fn sasl_ssl_sets_mechanism_credentials_and_ca() {
        let s = parse(&[
            "--kafka-security-protocol",
            "sasl_ssl",
            "--kafka-sasl-mechanism",
            "scram-sha-256",
            "--kafka-username",
            "u",
            "--kafka-password",
            "p",
            "--kafka-ca-file",
            "/ca.pem",
        ])
        .expect("valid");
        let settings = s.client_settings();
        for (key, value) in [
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "SCRAM-SHA-256"),
            ("sasl.username", "u"),
            ("sasl.password", "p"),
            ("ssl.ca.location", "/ca.pem"),
            ("ssl.endpoint.identification.algorithm", "https"),
        ] {
            assert!(
                settings.contains(&(key, value.to_owned())),
                "{key}={value} missing from {settings:?}"
            );
        }
        assert!(!format!("{s:?}").contains("\"p\""), "password in {s:?}");
    }

    #[test]
    fn impossible_combinations_are_refused() {
        let sasl = parse(&[
            "--kafka-security-protocol",
            "SASL_SSL",
            "--kafka-username",
            "u",
        ]);
        assert!(sasl.unwrap_err().contains("--kafka-password"));
        let plain = parse(&["--kafka-username", "u", "--kafka-password", "p"]);
        assert!(plain.unwrap_err().contains("PLAINTEXT"));
        let ca = parse(&["--kafka-ca-file", "/ca.pem"]);
        assert!(ca.unwrap_err().contains("--kafka-ca-file"));
        assert!(parse(&["--kafka-security-protocol", "tls"]).is_err());
        let ssl = parse(&["--kafka-security-protocol", "SSL", "--kafka-ca-file", "/ca"]);
        assert_eq!(ssl.expect("valid").protocol, SecurityProtocol::Ssl);
    }
}
