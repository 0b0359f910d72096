/*
 * rig_clientid - a mosquitto 2.0 plugin (plugin API version 5) that takes a client's
 * identity from its TLS client certificate and refuses a connection whose MQTT client
 * id differs from that identity.
 *
 * RainMaker's cloud policy: a node may connect only when its client id equals its node
 * id, which is the CN of its certificate (rainmaker-protocol.md section 1.1; doc page
 * https://rainmaker.espressif.com/docs/spec-node-cloud). mosquitto's acl_file cannot
 * refuse a *connection*, and with `use_identity_as_username true` mosquitto 2.0.11 does
 * not run the MOSQ_EVT_BASIC_AUTH callbacks at all (it treats the certificate as the
 * whole authentication; observed with this broker, see rig/cloud/broker.py). So this
 * plugin does the identity step itself, on MOSQ_EVT_BASIC_AUTH, which mosquitto runs
 * for every CONNECT once the TLS handshake (chain, CRL) has succeeded:
 *
 *   1. read the peer certificate (mosquitto_client_certificate; require_certificate
 *      is on, so it is the verified leaf) and its single CN, refusing an absent CN,
 *      several CNs or a CN with an embedded NUL;
 *   2. refuse (MOSQ_ERR_AUTH -> CONNACK "not authorised") when the client id is not
 *      exactly the CN, unless the CN is the cloud's own service identity
 *      (plugin_opt_service_identity), which may use any client id;
 *   3. replace whatever MQTT username the client sent with the CN
 *      (mosquitto_set_username), so the acl_file's `%u` patterns see the certificate
 *      identity - what use_identity_as_username would have done.
 *
 * Topic policy stays in the acl_file. Log lines start with "rig_clientid:" and never
 * contain key material.
 */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

#include <openssl/asn1.h>
#include <openssl/crypto.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define RIG_MAX_IDENTITY 256

static mosquitto_plugin_id_t *rig_plugin_id = NULL;
static char *rig_service_identity = NULL;

/* Copy the certificate subject's only CN, as UTF-8, into dst. Returns 0 on success. */
static int rig_certificate_cn(X509 *cert, char *dst, size_t dst_len)
{
	X509_NAME *subject = X509_get_subject_name(cert);
	if(subject == NULL){
		return -1;
	}
	int idx = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
	if(idx < 0 || X509_NAME_get_index_by_NID(subject, NID_commonName, idx) >= 0){
		return -1; /* no CN, or more than one */
	}
	ASN1_STRING *value = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, idx));
	unsigned char *utf8 = NULL;
	int len = ASN1_STRING_to_UTF8(&utf8, value);
	if(len <= 0){
		return -1;
	}
	int rc = -1;
	if((size_t)len < dst_len && memchr(utf8, '\0', (size_t)len) == NULL){
		memcpy(dst, utf8, (size_t)len);
		dst[len] = '\0';
		rc = 0;
	}
	OPENSSL_free(utf8);
	return rc;
}

static int rig_on_basic_auth(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)userdata;
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *client_id = mosquitto_client_id(ed->client);
	const char *address = mosquitto_client_address(ed->client);
	char cn[RIG_MAX_IDENTITY];

	X509 *cert = mosquitto_client_certificate(ed->client);
	if(cert == NULL){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "rig_clientid: refused %s: no client certificate", address);
		return MOSQ_ERR_AUTH;
	}
	int cn_rc = rig_certificate_cn(cert, cn, sizeof(cn));
	X509_free(cert);
	if(cn_rc != 0){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "rig_clientid: refused %s: certificate has no single usable CN", address);
		return MOSQ_ERR_AUTH;
	}

	bool is_service = rig_service_identity != NULL && strcmp(cn, rig_service_identity) == 0;
	if(!is_service && (client_id == NULL || strcmp(client_id, cn) != 0)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"rig_clientid: refused %s: client id '%.64s' is not the certificate CN '%s'",
				address, client_id ? client_id : "", cn);
		return MOSQ_ERR_AUTH;
	}
	if(mosquitto_set_username(ed->client, cn) != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_ERR, "rig_clientid: refused %s: could not set username to CN '%s'", address, cn);
		return MOSQ_ERR_AUTH;
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, "rig_clientid: accepted %s as '%s'%s", address, cn, is_service ? " (service identity)" : "");
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5){
			return 5;
		}
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	rig_plugin_id = identifier;
	for(int i = 0; i < option_count; i++){
		if(strcmp(options[i].key, "service_identity") == 0){
			mosquitto_free(rig_service_identity);
			rig_service_identity = mosquitto_strdup(options[i].value);
			if(rig_service_identity == NULL){
				return MOSQ_ERR_NOMEM;
			}
		}
	}
	if(rig_service_identity == NULL){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "rig_clientid: no plugin_opt_service_identity; every client id must equal its CN");
	}
	return mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, rig_on_basic_auth, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	int rc = mosquitto_callback_unregister(rig_plugin_id, MOSQ_EVT_BASIC_AUTH, rig_on_basic_auth, NULL);
	mosquitto_free(rig_service_identity);
	rig_service_identity = NULL;
	return rc;
}
