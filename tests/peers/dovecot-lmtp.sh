#!/bin/sh
# Private Dovecot LMTP instance for tests (test-peers.md §2; run as root).
# usage: dovecot-lmtp.sh DIR PORT CERT KEY   -- execs dovecot in the foreground
set -e
D=$1; PORT=$2; CERT=$3; KEY=$4
mkdir -p "$D/run" "$D/state" "$D/mail"
chmod 0755 "$D"   # mkdtemp gives 0700: dovecot auth (uid dovecot) and delivery (uid nobody) need +x
chown nobody:nogroup "$D/mail" 2>/dev/null || true   # as root: mail is written as nobody
printf 'unknown@example.test:::::::\n' > "$D/deny-users"
printf 'tempfail@example.test:::::::\n' > "$D/tempfail-users"
printf 'full@example.test:::::::\n' > "$D/full-users"
printf 'full5xx@example.test:::::::\n' > "$D/full5xx-users"
cat > "$D/dovecot.conf" <<EOF
base_dir = $D/run
state_dir = $D/state
instance_name = mtatest-$PORT
log_path = $D/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = yes
ssl_cert = <$CERT
ssl_key = <$KEY
login_trusted_networks = 127.0.0.0/8
default_internal_user = dovecot
default_login_user = dovenull
mail_uid = nobody
mail_gid = nogroup
mail_location = maildir:$D/mail/%d/%n/Maildir
recipient_delimiter = +
lmtp_rcpt_check_quota = yes
quota_full_tempfail = yes
mail_plugins = \$mail_plugins quota
plugin {
  quota = count:User quota
  quota_vsizes = yes
}
passdb {
  driver = static
  args = nopassword=y
}
# 1) deny list: found here => "550 5.1.1 User doesn't exist" at RCPT
userdb {
  driver = passwd-file
  args = username_format=%u $D/deny-users
  result_success = return-fail
}
# 2) broken mail storage => "451 4.3.0 Temporary internal error" at RCPT
userdb {
  driver = passwd-file
  args = username_format=%u $D/tempfail-users
  override_fields = mail=nosuchdriver:/nonexistent
}
# 3) 1-byte quota => 250 at RCPT, then "452 4.2.2 Quota exceeded" after DATA
userdb {
  driver = passwd-file
  args = username_format=%u $D/full-users
  default_fields = home=$D/mail/%d/%n
  override_fields = quota_rule=*:storage=1B
}
# 3b) same, permanent => "552 5.2.2 Quota exceeded" after DATA
userdb {
  driver = passwd-file
  args = username_format=%u $D/full5xx-users
  default_fields = home=$D/mail/%d/%n
  override_fields = quota_rule=*:storage=1B quota_full_tempfail=no
}
# 4) everyone else at any domain is accepted
userdb {
  driver = static
  args = home=$D/mail/%d/%n allow_all_users=yes
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $PORT
  }
}
EOF
exec dovecot -F -c "$D/dovecot.conf"
